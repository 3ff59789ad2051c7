"""``tailor``: the command line over ``TailorClient``.

    tailor --key $ADMIN tenants create acme            # prints the tenant's key (once)
    export TAILOR_API_KEY=tk-...
    tailor adapters import sentiment ./my-peft-adapter  # a zip or a save_pretrained folder
    tailor train sentiment reviews.jsonl --wait         # upload, train, watch (progress bar, live loss)
    tailor predict sentiment "great service" "awful food"
    tailor predict products --image shoe.jpg boot.png     # an image adapter
    tailor train products photos.zip --wait             # a zip of label/<image> folders: images
    tailor train support-bot chats.jsonl --wait         # {"messages": [...]} lines: text generation
    tailor chat support-bot "Where is my order?"        # the reply streams to the terminal
    tailor adapters promote sentiment 2 ; tailor adapters rollback sentiment
    tailor adapters export sentiment -o sentiment.zip
    tailor worker                                       # a training worker (TAILOR_* settings)

The server is ``--url`` or ``$TAILOR_URL`` (default http://127.0.0.1:3000); the key is
``--key`` or ``$TAILOR_API_KEY``. What a command prints on stdout is JSON (``predict --tsv``
prints ``label<TAB>score<TAB>text`` lines instead, when asked; ``chat`` prints the reply's text as
it arrives, ``--json`` the whole chat.completion instead); errors go to stderr as
``error: <status> <code>: <message>`` with exit status 1. Progress (bars on a terminal, event
lines elsewhere) goes to stderr. A group given alone lists: ``tailor files``, ``tailor jobs``,
``tailor adapters``, ``tailor tenants``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx

from adapters.jobs.model import METHODS, PROMOTE_MODES
from adapters.tasks import IMAGE_CLASSIFICATION, TASK_NAMES, TEXT_GENERATION
from service.api_types import JobOut, Task
from service.client import TailorAPIError, TailorClient
from service.job_progress import JobProgress


LISTS_WHEN_ALONE = ("tenants", "adapters", "files", "jobs")  # a group given alone lists


def _quota(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"quota {text!r}: use KEY=VALUE, e.g. max_adapters=10")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"quota {text!r}: VALUE must be a number") from None
    return key, int(number) if number.is_integer() else number


def _hyperparameter(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"hyper-parameter {text!r}: use KEY=VALUE, e.g. epochs=3")
    try:
        return key, json.loads(value)  # numbers, true/false, lists such as ["query","value"]
    except ValueError:
        return key, value  # a plain word, e.g. lr_scheduler=cosine


def _labels(text: str) -> list[str]:
    return [x.strip() for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tailor", description="Tailor: many tenants' LoRA adapters on one base model.")
    p.add_argument("--url", help="server URL (default $TAILOR_URL or http://127.0.0.1:3000)")
    p.add_argument("--key", help="API key (default $TAILOR_API_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    bars = p.add_mutually_exclusive_group()
    bars.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                      help="no progress bars (job events are printed as lines)")
    bars.add_argument("--progress", dest="progress", action="store_true",
                      help="progress bars even when stderr is not a terminal")
    sub = p.add_subparsers(dest="group", required=True)

    t = sub.add_parser("tenants", help="manage tenants (admin key); alone, lists them").add_subparsers(dest="cmd")
    c = t.add_parser("create", help="create a tenant; prints its first API key (shown once)")
    c.add_argument("name")
    c.add_argument("--quota", action="append", type=_quota, default=[], metavar="KEY=VALUE")
    t.add_parser("list")
    t.add_parser("delete", help="delete a tenant and everything it owns").add_argument("name")

    k = sub.add_parser("keys", help="manage a tenant's API keys (admin key)").add_subparsers(dest="cmd", required=True)
    k.add_parser("create").add_argument("tenant")
    k.add_parser("list").add_argument("tenant")
    r = k.add_parser("revoke")
    r.add_argument("tenant")
    r.add_argument("key_id")

    a = sub.add_parser("adapters", help="manage adapters (tenant key); alone, lists them").add_subparsers(dest="cmd")
    a.add_parser("list")
    a.add_parser("show").add_argument("name")
    pr = a.add_parser("promote", help="point prod (or --alias) at a version")
    pr.add_argument("name")
    pr.add_argument("version", type=int)
    pr.add_argument("--alias", default="prod")
    rb = a.add_parser("rollback", help="point prod back at its previous version")
    rb.add_argument("name")
    rb.add_argument("--alias", default="prod")
    a.add_parser("delete").add_argument("name")
    im = a.add_parser("import", help="import a peft adapter (zip or save_pretrained folder)")
    im.add_argument("name")
    im.add_argument("path", type=Path)
    im.add_argument("--labels", type=_labels, help="label names, comma-separated")
    g = im.add_mutually_exclusive_group()
    g.add_argument("--promote", dest="promote", action="store_true", default=None)
    g.add_argument("--no-promote", dest="promote", action="store_false")
    im.add_argument("--task", choices=TASK_NAMES,
                    help="the adapter's task (default: what the adapter says, else the server decides)")
    ex = a.add_parser("export", help="download a version as a zip of peft files")
    ex.add_argument("name")
    ex.add_argument("--version", help="version number or alias (default prod)")
    ex.add_argument("-o", "--output", type=Path, help="file to write (default NAME-vVERSION.zip)")

    pd = sub.add_parser("predict", help="classify texts or images (tenant key); '-' reads lines from stdin")
    pd.add_argument("adapter", help='"name", "name@3" or "name@prod"')
    pd.add_argument("texts", nargs="*", help="texts, for a text adapter")
    pd.add_argument("--image", dest="images", nargs="+", type=Path, metavar="FILE",
                    help="image files, for an image adapter")
    pd.add_argument("--tsv", action="store_true",
                    help="print '# ADAPTER@VERSION', then one 'label<TAB>score<TAB>text' (or image path) line "
                         "per input")
    pd.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the default; older scripts pass it

    ch = sub.add_parser("chat", help="chat with a generation adapter (tenant key); the reply streams as it comes",
                        description="Sends MESSAGE (words joined; '-' reads stdin) as the user's turn to "
                                    "/v1/chat/completions and prints the reply as it is generated.")
    ch.add_argument("adapter", help='"name", "name@3", "name@prod", or the base model\'s name (tailor models)')
    ch.add_argument("message", nargs="+")
    ch.add_argument("--system", help="a system message before it")
    ch.add_argument("--max-tokens", type=int)
    ch.add_argument("--temperature", type=float)
    ch.add_argument("--top-p", type=float)
    ch.add_argument("--seed", type=int)
    ch.add_argument("--stop", action="append", help="a stop string (repeatable)")
    ch.add_argument("--json", action="store_true", help="print the whole chat.completion as JSON, not streamed")
    sub.add_parser("models", help="the generation adapters and base model this key may chat with")

    f = sub.add_parser("files", help="training data files (tenant key); alone, lists them").add_subparsers(dest="cmd")
    up = f.add_parser("upload")
    up.add_argument("path", type=Path)
    up.add_argument("--format", choices=["jsonl", "csv", "zip"])
    _task_option(up)
    f.add_parser("list")
    f.add_parser("show").add_argument("file_id")
    f.add_parser("delete").add_argument("file_id")

    tr = sub.add_parser("train", help="train a new version of ADAPTER from FILE (tenant key)",
                        description="Uploads FILE (a local JSONL/CSV file; an uploaded file's id is used as is), "
                                    "starts a fine-tuning job and prints it. With --wait it shows the job's progress "
                                    "and live loss until it ends, prints the finished job, and exits 1 unless it "
                                    "succeeded.")
    tr.add_argument("adapter")
    tr.add_argument("file", help="a local JSONL/CSV file, a zip of label/<image> folders, or an uploaded file id "
                                 "(file-...)")
    tr.add_argument("--validation", help="validation data: a local file or a file id (default: split off FILE)")
    _task_option(tr)
    _job_options(tr)
    tr.add_argument("--wait", action="store_true", help="follow the job until it finishes")

    jobs = sub.add_parser("jobs", help="fine-tuning jobs (tenant key); alone, lists them")
    j = jobs.add_subparsers(dest="cmd")
    jc = j.add_parser("create", help="train a new version of ADAPTER")
    jc.add_argument("adapter")
    src = jc.add_mutually_exclusive_group(required=True)
    src.add_argument("--training-file", help="an uploaded file id")
    src.add_argument("--training", type=Path, help="a local JSONL/CSV file or image zip (uploaded first)")
    jc.add_argument("--validation-file")
    _task_option(jc)
    _job_options(jc)
    jc.add_argument("--follow", action="store_true", help="follow the job until it finishes")
    jl = j.add_parser("list")
    jl.add_argument("--status")
    jl.add_argument("--limit", type=int, default=20)
    j.add_parser("show").add_argument("job_id")
    j.add_parser("events").add_argument("job_id")
    j.add_parser("cancel").add_argument("job_id")
    j.add_parser("follow", help="print events until the job finishes").add_argument("job_id")
    sv = sub.add_parser("serve", help="start the service (bentoml serve) with its own metrics folder",
                        description="Runs 'bentoml serve service.service:Tailor' on --host/--port with "
                                    "BENTOML_HOME set to $TAILOR_HOME/instances/<host>-<port>, so this "
                                    "instance's /metrics are its own (see service/instance.py). Any further "
                                    "arguments go to bentoml serve.")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=3000, help="port to listen on (default 3000)")
    w = sub.add_parser("worker", help="run a training worker: pull queued jobs from the registry and train them "
                                      "(reads TAILOR_DATABASE_URL, TAILOR_STORE_URL, TAILOR_BASE_MODEL, TAILOR_HOME)")
    w.add_argument("--threads", type=int, default=None, help="torch threads (default $TAILOR_TRAIN_THREADS or all)")
    w.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    w.add_argument("--once", action="store_true", help="run at most one job, then exit")
    w.add_argument("--nice", type=int, default=0, help="CPU priority offset (10 when sharing cores with serving)")
    st = sub.add_parser("store", help="maintain the adapter store (reads the TAILOR_* settings, like worker)")
    gc = st.add_subparsers(dest="cmd", required=True).add_parser(
        "gc", help="delete objects no database row refers to (left by deletes during a store outage or crashes)")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    gc.add_argument("--grace-hours", type=float, default=6.0,
                    help="keep unreferenced objects younger than this (default 6: writes in flight)")
    return p


def _task_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASK_NAMES,
                        help=f"what a local data file trains (default: from the data: {IMAGE_CLASSIFICATION} for "
                             f"a .zip or JSON Lines of images, {TEXT_GENERATION} for JSON Lines of chats "
                             "({\"messages\"}) or {\"prompt\", \"completion\"}, else text-classification)")


SNIFF_BYTES = 1 << 20  # how much of a local file is read to tell its task


def _file_task(path: Path, task: str | None) -> Task | None:
    """The task to upload ``path`` for: ``task`` when given; else from the data: images for a zip,
    and for JSON Lines the first record's keys (``messages``, or ``prompt`` and ``completion``: text
    generation; ``image``: images); else None (the server's default, text-classification)."""
    if task is not None:
        return cast("Task", task)
    if path.suffix.lower() == ".zip":
        return IMAGE_CLASSIFICATION
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return None  # not a local file (an uploaded file's id): the server knows its task
    for line in head.splitlines():
        if line.strip():
            try:
                first = json.loads(line)
            except ValueError:
                return None  # CSV, or a broken line the upload names
            if isinstance(first, dict) and ("messages" in first or {"prompt", "completion"} <= first.keys()):
                return TEXT_GENERATION
            if isinstance(first, dict) and "image" in first:
                return IMAGE_CLASSIFICATION
            return None
    return None


def _job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument("--promote", choices=PROMOTE_MODES, default="auto")
    parser.add_argument("--hp", action="append", type=_hyperparameter, default=[], metavar="KEY=VALUE",
                        help='a hyper-parameter, e.g. epochs=3 or target_modules=\'["query","value"]\' (repeatable)')


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _follow(client: TailorClient, job_id: str, bar: bool) -> JobOut:
    """Show the job's events until it ends (on stderr); the finished job."""
    with JobProgress(sys.stderr, bar=bar) as view:
        for event in client.follow_job(job_id):
            view.show(event)
        job = client.get_job(job_id)
        view.finish(job["status"])
    version = f" as version {job['version']}" if job.get("version") else ""
    print(f"job {job_id}: {job['status']}{version}", file=sys.stderr)
    return job


def _exit_status(job: JobOut) -> int:
    return 0 if job["status"] == "succeeded" else 1


def _data_file(client: TailorClient, source: str | Path, progress: bool, made: list[str],
               task: str | None = None) -> str:
    """An uploaded file's id: ``source`` itself when it is one, else ``source`` uploaded for
    ``task`` (``_file_task``; its id appended to ``made``)."""
    path = Path(source)
    if not path.exists() and str(source).startswith("file-"):
        return str(source)  # the server checks it (404 names it when it is not this tenant's)
    if not path.is_file():
        raise OSError(f"{source}: no such file (give a local JSONL/CSV file, an image zip or an uploaded file id)")
    made.append(client.upload_file(path, task=_file_task(path, task), progress=progress)["id"])
    return made[-1]


def _train(client: TailorClient, args: argparse.Namespace, progress: bool) -> JobOut:
    """Upload what is local, start the job; a refused job takes its uploads with it."""
    made: list[str] = []
    try:
        training = _data_file(client, args.file, progress, made, args.task)
        # a validation file is of the training file's task
        task = _file_task(Path(args.file), args.task)
        validation = _data_file(client, args.validation, progress, made, task) if args.validation else None
        return _create_job(client, args, training, validation)
    except (TailorAPIError, OSError):
        for file_id in made:
            with contextlib.suppress(TailorAPIError, httpx.HTTPError):  # the refusal is the news
                client.delete_file(file_id)
        raise


def _create_job(client: TailorClient, args: argparse.Namespace, training_file: str,
                validation_file: str | None) -> JobOut:
    return client.create_job(args.adapter, training_file=training_file, validation_file=validation_file,
                             method=args.method, promote=args.promote, hyperparameters=dict(args.hp))


def _chat(client: TailorClient, args: argparse.Namespace) -> int:
    """``tailor chat``: the reply to stdout as it is generated (or whole, as JSON, with --json)."""
    text = sys.stdin.read() if args.message == ["-"] else " ".join(args.message)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": text}]
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "stop": args.stop}
    if args.json:
        _print(client.chat(args.adapter, messages, **sampling))
        return 0
    for piece in client.chat_stream(args.adapter, messages, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run(args: argparse.Namespace, client: TailorClient) -> int:
    """Carry out one command; its exit status."""
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    g, cmd = args.group, getattr(args, "cmd", None)
    if cmd is None and g in LISTS_WHEN_ALONE:
        cmd = "list"
        args.limit, args.status = 20, None
    table: dict[tuple[str, str | None], Callable[[], Any]] = {
        ("tenants", "create"): lambda: client.create_tenant(args.name, dict(args.quota) or None),
        ("tenants", "list"): client.list_tenants,
        ("tenants", "delete"): lambda: client.delete_tenant(args.name),
        ("keys", "create"): lambda: client.create_key(args.tenant),
        ("keys", "list"): lambda: client.list_keys(args.tenant),
        ("keys", "revoke"): lambda: client.revoke_key(args.tenant, args.key_id),
        ("adapters", "list"): client.list_adapters,
        ("adapters", "show"): lambda: client.get_adapter(args.name),
        ("adapters", "promote"): lambda: client.promote(args.name, args.version, args.alias),
        ("adapters", "rollback"): lambda: client.rollback(args.name, args.alias),
        ("adapters", "delete"): lambda: client.delete_adapter(args.name),
        ("adapters", "import"): lambda: client.import_adapter(args.name, args.path, labels=args.labels,
                                                              promote=args.promote, task=args.task,
                                                              progress=progress),
        ("files", "upload"): lambda: client.upload_file(args.path, format=args.format,
                                                        task=_file_task(args.path, args.task),
                                                        progress=progress),
        ("files", "list"): client.list_files,
        ("files", "show"): lambda: client.get_file(args.file_id),
        ("files", "delete"): lambda: client.delete_file(args.file_id),
        ("jobs", "list"): lambda: client.list_jobs(limit=args.limit, status=args.status),
        ("jobs", "show"): lambda: client.get_job(args.job_id),
        ("jobs", "events"): lambda: client.job_events(args.job_id),
        ("jobs", "cancel"): lambda: client.cancel_job(args.job_id),
    }
    if (g, cmd) in table:
        _print(table[(g, cmd)]())
    elif g == "adapters" and cmd == "export":
        data = client.export_adapter(args.name, args.version, progress=progress)
        version = args.version or "prod"
        out = args.output or Path(f"{args.name}-v{version}.zip")
        out.write_bytes(data)
        _print({"adapter": args.name, "version": version, "path": str(out), "bytes": len(data)})
    elif g == "predict":
        if bool(args.texts) == bool(args.images):
            raise OSError("give texts (a text adapter) or --image FILE... (an image adapter), not both or neither")
        if args.images:
            shown = [str(p) for p in args.images]
            result = client.predict(args.adapter, images=args.images)
        else:
            texts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.texts == ["-"] else args.texts
            shown, result = texts, client.predict(args.adapter, texts)
        if args.tsv:
            print(f"# {result['adapter']}@{result['version']}")
            for text, p in zip(shown, result["predictions"]):
                print(f"{p['label']}\t{p['score']:.4f}\t{text}")
        else:
            _print(result)
    elif g == "chat":
        return _chat(client, args)
    elif g == "models":
        _print(client.list_models()["data"])
    elif g == "train":
        job = _train(client, args, progress)
        if not args.wait:
            _print(job)
            return 0
        print(f"job {job['id']}: {job['status']} (adapter {job['adapter']})", file=sys.stderr)
        job = _follow(client, job["id"], progress)
        _print(job)
        return _exit_status(job)
    elif g == "jobs" and cmd == "create":
        training_file = args.training_file
        if args.training is not None:
            training_file = _data_file(client, args.training, progress, [], args.task)
        job = _create_job(client, args, training_file, args.validation_file)
        _print(job)
        if args.follow:
            return _exit_status(_follow(client, job["id"], progress))
    elif g == "jobs" and cmd == "follow":
        return _exit_status(_follow(client, args.job_id, progress))
    else:  # pragma: no cover - argparse enforces the choices
        raise SystemExit(f"unknown command {g} {cmd}")
    return 0


def serve_command(args: argparse.Namespace, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """``tailor serve``: the ``bentoml serve`` command line and its environment."""
    import os

    from service.instance import instance_env

    exe = Path(sys.executable).parent / "bentoml"
    bentoml = [str(exe)] if exe.is_file() else [sys.executable, "-m", "bentoml"]
    argv = [*bentoml, "serve", "service.service:Tailor", "--host", args.host, "--port", str(args.port), *extra]
    return argv, instance_env(os.environ, args.port)


def run_serve(args: argparse.Namespace, extra: list[str]) -> int:
    """Replace this process with ``bentoml serve`` (signals reach it directly)."""
    import os

    argv, env = serve_command(args, extra)
    print(f"tailor serve: http://{args.host}:{args.port} (metrics folder {env['BENTOML_HOME']})", file=sys.stderr)
    os.execve(argv[0], argv, env)
    return 1  # pragma: no cover - execve does not return


def run_worker(args: argparse.Namespace) -> int:
    """``tailor worker``: the training worker, in this process, configured like the service's
    pool (``adapters.jobs.supervisor.worker_args``)."""
    from adapters.jobs import worker
    from adapters.jobs.supervisor import worker_args
    from service.settings import Settings, SettingsError

    try:
        s = Settings.from_env(admin_key=False)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    worker.main(worker_args(s, threads=args.threads or s.train_threads, device=args.device, nice=args.nice,
                            once=args.once))
    return 0


def run_store_gc(args: argparse.Namespace) -> int:
    """``tailor store gc``: one garbage-collection round over the configured database and store."""
    import sqlalchemy

    from adapters import store_gc
    from adapters.errors import TailorError
    from adapters.schema import make_engine
    from adapters.store import open_store
    from service.settings import Settings, SettingsError

    if args.grace_hours < 0:
        print("error: --grace-hours must not be negative", file=sys.stderr)
        return 2
    try:
        s = Settings.from_env(admin_key=False)
        db = make_engine(s.database_url)
        try:
            sqlite_missing = db.url.get_backend_name() == "sqlite" and not Path(db.url.database or "").is_file()
            if sqlite_missing or not sqlalchemy.inspect(db).has_table("tenants"):  # a wrong TAILOR_HOME or URL
                print(f"error: {db.url.render_as_string()} holds no Tailor registry", file=sys.stderr)
                return 1
            report = store_gc.collect(db, open_store(s.store_url), grace_s=args.grace_hours * 3600,
                                      dry_run=args.dry_run)
        finally:
            db.dispose()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TailorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print(report.as_dict())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.group == "serve":
        return run_serve(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.group == "worker":
        return run_worker(args)
    if args.group == "store":
        return run_store_gc(args)
    try:
        with TailorClient(args.url, args.key, timeout=args.timeout) as client:
            return run(args, client)
    except TailorAPIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"error: cannot reach the server: {e}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
