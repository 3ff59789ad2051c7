"""The service's settings, read once from ``TAILOR_*`` environment variables and validated.

Every bad value raises ``SettingsError`` naming the variable, what was given and what is
accepted, so a misconfigured deployment fails at start with one clear line.

``TAILOR_ADMIN_KEY`` unset: a key is generated at the first start into
``$TAILOR_HOME/admin_key`` (mode 0600, created atomically so several processes agree) and
logged once, by the process that created it; later starts reuse the file. Reading the
settings does not create it (``from_env(admin_key=False)``, e.g. when ``bentoml build``
imports the service): ``with_admin_key()`` does, when a worker starts.

Tasks: ``TAILOR_TASKS`` lists the task kinds this deployment serves (default both,
``text-classification,image-classification``); each enabled task loads one frozen base:
``TAILOR_BASE_MODEL`` for text (default the bundled MiniLM), ``TAILOR_IMAGE_BASE_MODEL`` for
images (default the bundled EfficientNet-Lite0; a local checkpoint directory; or ``tiny`` /
``tiny:SEED``, a tiny random network of the same layout for tests, whose predictions mean
nothing). A base of a task that is not enabled is never loaded. Text generation
(``text-generation``, not served unless listed) loads ``TAILOR_GENERATION_BASE_MODEL``: unset for
the bundled SmolLM2-135M-Instruct, ``tiny[:SEED]`` (a tiny random Llama, tests) or a local
causal-LM directory; ``TAILOR_GENERATION_KV_CACHE_BYTES`` bounds its KV cache (default 512 MiB)
and ``TAILOR_GENERATION_ADMISSION_TIMEOUT_S`` how long a request waits for room in it before a
429 with Retry-After (default 10).

Runtime: ``TAILOR_RUNTIME`` runs each base's forward pass on ``torch`` (default), ``onnx`` (ONNX
Runtime, CPU) or ``auto`` (ONNX on a CPU base that exports, torch on CUDA); ``TAILOR_QUANTIZE``
``none`` (default) or ``int8`` (ONNX only). A base that cannot serve on ONNX logs why and keeps
torch (``adapters.runtime.onnx.runtime``).
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

from adapters.tasks import IMAGE_CLASSIFICATION, TASK_NAMES, TEXT_CLASSIFICATION

# served when TAILOR_TASKS is unset: the classifiers; text generation (a 135M-parameter model) only when asked for
DEFAULT_TASKS = (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION)

log = logging.getLogger("tailor.service")

MIB = 1 << 20
TINY_IMAGE_BASE = "tiny"  # TAILOR_IMAGE_BASE_MODEL=tiny or tiny:SEED: a tiny random vision base (tests)
# TAILOR_RUNTIME / TAILOR_QUANTIZE values: adapters.runtime.onnx.runtime's RUNTIMES / QUANTIZE (not imported: torch)
RUNTIMES = ("torch", "onnx", "auto")
QUANTIZE = ("none", "int8")
ADMIN_KEY_PREFIX = "ta-"
MIN_ADMIN_KEY_CHARS = 16


class SettingsError(ValueError):
    """A TAILOR_* variable has a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    home: Path
    admin_key: str = field(repr=False)
    base_model: str | None
    database_url: str
    store_url: str
    tasks: tuple[str, ...] = DEFAULT_TASKS  # the task kinds served, each on its own base
    image_base_model: str | None = None  # None: the bundled EfficientNet-Lite0
    generation_base_model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    generation_kv_cache_bytes: int = 512 * MIB  # the generation engine's KV-cache budget
    generation_admission_timeout_s: float = 10.0  # a request waits this long for KV room, then 429
    max_resident: int = 4096
    device_slots: int = 257
    max_batch_size: int = 32
    split_cost_tokens: int | None = None  # TAILOR_SPLIT_COST_TOKENS: see adapters.runtime.engine.EngineConfig
    max_wait_ms: float = 5.0
    max_inputs: int = 64
    max_input_chars: int = 10_000
    max_body_bytes: int = 10 * MIB
    max_upload_bytes: int = 64 * MIB
    max_images: int = 16  # images per predict request
    max_image_bytes: int = 4 * MIB  # bytes of one image
    max_image_pixels: int = 40_000_000  # pixels of one image (from its header, before decoding)
    rate_limit: float = 50.0  # requests/s per tenant and serving worker; 0 = none
    max_queued_rows: int = 256  # rows one tenant may have waiting for a batch, per serving worker
    tracing: bool = False  # OpenTelemetry spans for /v1 routes (TAILOR_TRACING=1; ~15% of a small request's CPU)
    workers: int | None = None  # None: auto (service.state.serving_workers)
    threads: int = 16
    train_workers: int = 1
    train_threads: int | None = None
    metrics_tenant_labels: bool = False
    store_gc_hours: float = 6.0  # idle training workers collect the store's garbage this often; 0: never
    access_log: bool = False  # BentoML's one INFO line per request (TAILOR_ACCESS_LOG=1)
    runtime: str = "torch"  # TAILOR_RUNTIME: torch | onnx | auto
    quantize: str = "none"  # TAILOR_QUANTIZE: none | int8 (ONNX only)
    admin_key_generated: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, admin_key: bool = True) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("TAILOR_HOME") or "./.tailor").expanduser().resolve()
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SettingsError(f"TAILOR_HOME={str(home)!r} cannot be created: {e}") from None
        if not os.access(home, os.W_OK):
            raise SettingsError(f"TAILOR_HOME={str(home)!r} is not writable")

        base_model = env.get("TAILOR_BASE_MODEL") or None
        if base_model is not None:
            p = Path(base_model).expanduser()
            if not p.is_dir():
                raise SettingsError(f"TAILOR_BASE_MODEL={base_model!r} is not a directory (give a local model folder)")
            if not (p / "config.json").is_file() or not (list(p.glob("*.safetensors")) or list(p.glob("*.bin"))):
                raise SettingsError(f"TAILOR_BASE_MODEL={base_model!r} holds no config.json and weights")
            base_model = str(p.resolve())

        tasks = _tasks(env)
        image_base_model = _image_base_model(env)
        generation_base_model = _generation_base_model(env)

        database_url = env.get("TAILOR_DATABASE_URL") or f"sqlite:///{home / 'tailor.db'}"
        if "://" not in database_url:
            raise SettingsError(f"TAILOR_DATABASE_URL={database_url!r} is not a URL (e.g. sqlite:///path.db)")
        store_url = env.get("TAILOR_STORE_URL") or f"file://{home / 'store'}"
        if store_url.startswith("s3://"):
            from adapters.store import parse_s3_url  # syntax only: no network at settings time

            try:
                parse_s3_url(store_url, env)
            except ValueError as e:
                shown = store_url.split("//", 1)[1].split("/", 1)[0]
                shown = store_url.replace(shown, "***@" + shown.rsplit("@", 1)[1]) if "@" in shown else store_url
                raise SettingsError(f"TAILOR_STORE_URL={shown!r}: {e}") from None
        elif not store_url.startswith("file://"):
            raise SettingsError(f"TAILOR_STORE_URL={store_url!r}: only file:// and s3:// stores are supported")

        max_batch_size = _int(env, "TAILOR_MAX_BATCH_SIZE", 32, lo=1, hi=4096)
        device_slots = _int(env, "TAILOR_DEVICE_SLOTS", max(257, max_batch_size + 1), lo=2)
        if device_slots <= max_batch_size:
            raise SettingsError(
                f"TAILOR_DEVICE_SLOTS={device_slots} must exceed TAILOR_MAX_BATCH_SIZE={max_batch_size} "
                "(a batch may name that many adapters, plus the base slot)"
            )
        given = env.get("TAILOR_ADMIN_KEY", "")
        if given and (len(given) < MIN_ADMIN_KEY_CHARS or any(c.isspace() for c in given)):
            raise SettingsError(
                f"TAILOR_ADMIN_KEY must be at least {MIN_ADMIN_KEY_CHARS} characters without whitespace"
            )
        settings = cls(
            home=home, admin_key=given, base_model=base_model, database_url=database_url,
            store_url=store_url, tasks=tasks, image_base_model=image_base_model,
            generation_base_model=generation_base_model,
            generation_kv_cache_bytes=_int(env, "TAILOR_GENERATION_KV_CACHE_BYTES", 512 * MIB, lo=1024),
            generation_admission_timeout_s=_float(env, "TAILOR_GENERATION_ADMISSION_TIMEOUT_S", 10.0, lo=0.0,
                                                  hi=3600.0),
            max_resident=_int(env, "TAILOR_MAX_RESIDENT", 4096, lo=1),
            device_slots=device_slots, max_batch_size=max_batch_size,
            split_cost_tokens=None if env.get("TAILOR_SPLIT_COST_TOKENS", "").strip().lower() in ("", "auto")
            else _int(env, "TAILOR_SPLIT_COST_TOKENS", None, lo=0, hi=1 << 30),
            max_wait_ms=_float(env, "TAILOR_MAX_WAIT_MS", 5.0, lo=0.0, hi=10_000.0),
            max_inputs=_int(env, "TAILOR_MAX_INPUTS", 64, lo=1, hi=100_000),
            max_input_chars=_int(env, "TAILOR_MAX_INPUT_CHARS", 10_000, lo=1),
            max_body_bytes=_int(env, "TAILOR_MAX_BODY_BYTES", 10 * MIB, lo=1024),
            max_upload_bytes=_int(env, "TAILOR_MAX_UPLOAD_BYTES", 64 * MIB, lo=1024),
            max_images=_int(env, "TAILOR_MAX_IMAGES", 16, lo=1, hi=4096),
            max_image_bytes=_int(env, "TAILOR_MAX_IMAGE_BYTES", 4 * MIB, lo=1024, hi=1 << 30),
            max_image_pixels=_int(env, "TAILOR_MAX_IMAGE_PIXELS", 40_000_000, lo=4096, hi=1 << 31),
            rate_limit=_float(env, "TAILOR_RATE_LIMIT", 50.0, lo=0.0, hi=1e6),
            max_queued_rows=_int(env, "TAILOR_MAX_QUEUED_ROWS", 256, lo=1, hi=10_000_000),
            tracing=_bool(env, "TAILOR_TRACING", False),
            workers=None if env.get("TAILOR_WORKERS", "").strip().lower() in ("", "auto")
            else _int(env, "TAILOR_WORKERS", None, lo=1, hi=256),
            threads=_int(env, "TAILOR_THREADS", 16, lo=1, hi=1024),
            train_workers=_int(env, "TAILOR_TRAIN_WORKERS", 1, lo=0, hi=64),
            train_threads=_int(env, "TAILOR_TRAIN_THREADS", None, lo=1, hi=1024),
            metrics_tenant_labels=_bool(env, "TAILOR_METRICS_TENANT_LABELS", False),
            store_gc_hours=_float(env, "TAILOR_STORE_GC_HOURS", 6.0, lo=0.0, hi=24 * 365),
            access_log=_bool(env, "TAILOR_ACCESS_LOG", False),
            runtime=_choice(env, "TAILOR_RUNTIME", "torch", RUNTIMES),
            quantize=_choice(env, "TAILOR_QUANTIZE", "none", QUANTIZE),
        )
        return settings.with_admin_key() if admin_key else settings

    @property
    def max_predict_bytes(self) -> int:
        """The body limit of ``POST /v1/predict``: ``max_body_bytes``, or more where images are
        served: room for ``max_images`` images of ``max_image_bytes`` each, sent as base64."""
        if IMAGE_CLASSIFICATION not in self.tasks:
            return self.max_body_bytes
        base64_image = 4 * ((self.max_image_bytes + 2) // 3)
        return max(self.max_body_bytes, self.max_images * base64_image + 64 * 1024)

    def with_admin_key(self) -> Settings:
        """These settings with the admin key resolved (generated into TAILOR_HOME if unset)."""
        if self.admin_key:
            return self
        key, generated = _admin_key(self.home)
        return replace(self, admin_key=key, admin_key_generated=generated)


def _tasks(env: dict[str, str]) -> tuple[str, ...]:
    """``TAILOR_TASKS``: a comma list of task names (default ``DEFAULT_TASKS``: both classifiers,
    not text generation), in canonical order."""
    raw = env.get("TAILOR_TASKS", "").strip()
    if not raw:
        return DEFAULT_TASKS
    given = [t.strip() for t in raw.split(",") if t.strip()]
    unknown = [t for t in given if t not in TASK_NAMES]
    if unknown or not given:
        raise SettingsError(f"TAILOR_TASKS={raw!r}: give one or more of {', '.join(TASK_NAMES)}, comma-separated"
                            + (f" ({unknown[0]!r} is not a task)" if unknown else ""))
    return tuple(t for t in TASK_NAMES if t in given)


def _image_base_model(env: dict[str, str]) -> str | None:
    """``TAILOR_IMAGE_BASE_MODEL``: None (bundled), ``tiny[:SEED]``, or a checkpoint directory
    holding a ``config.json`` (its architecture is checked when the base loads)."""
    raw = env.get("TAILOR_IMAGE_BASE_MODEL", "").strip()
    if not raw:
        return None
    if raw == TINY_IMAGE_BASE or raw.startswith(TINY_IMAGE_BASE + ":"):
        seed = raw.partition(":")[2]
        if seed and not seed.isdigit():
            raise SettingsError(f"TAILOR_IMAGE_BASE_MODEL={raw!r}: use tiny or tiny:SEED with an integer SEED")
        return raw
    p = Path(raw).expanduser()
    if not p.is_dir():
        raise SettingsError(f"TAILOR_IMAGE_BASE_MODEL={raw!r} is not a directory (give a local vision checkpoint "
                            "folder, or leave it unset for the bundled EfficientNet-Lite0)")
    if not (p / "config.json").is_file():
        raise SettingsError(f"TAILOR_IMAGE_BASE_MODEL={raw!r} holds no config.json naming its architecture")
    return str(p.resolve())


def _generation_base_model(env: dict[str, str]) -> str | None:
    """``TAILOR_GENERATION_BASE_MODEL``: None (the bundled SmolLM2), ``tiny[:SEED]``, or a local
    causal-LM directory holding a ``config.json`` (architecture and weights are checked when the
    base loads: ``adapters.generation.base``)."""
    raw = env.get("TAILOR_GENERATION_BASE_MODEL", "").strip()
    if not raw:
        return None
    if raw == TINY_IMAGE_BASE or raw.startswith(TINY_IMAGE_BASE + ":"):
        seed = raw.partition(":")[2]
        if seed and not seed.isdigit():
            raise SettingsError(f"TAILOR_GENERATION_BASE_MODEL={raw!r}: use tiny or tiny:SEED with an integer SEED")
        return raw
    p = Path(raw).expanduser()
    if not p.is_dir():
        raise SettingsError(f"TAILOR_GENERATION_BASE_MODEL={raw!r} is not a directory (give a local causal-LM "
                            "folder, or leave it unset for the bundled SmolLM2-135M-Instruct)")
    if not (p / "config.json").is_file():
        raise SettingsError(f"TAILOR_GENERATION_BASE_MODEL={raw!r} holds no config.json naming its architecture")
    return str(p.resolve())


def _int(env: dict[str, str], name: str, default: int | None, *, lo: int | None = None,
         hi: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default  # type: ignore[return-value]
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SettingsError(f"{name}={value} is out of range ({_range(lo, hi)})")
    return value


def _float(env: dict[str, str], name: str, default: float, *, lo: float | None = None,
           hi: float | None = None) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SettingsError(f"{name}={raw} is out of range ({_range(lo, hi)})")
    return value


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r}: use 1/0, true/false, yes/no or on/off")


def _choice(env: dict[str, str], name: str, default: str, options: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in options:
        raise SettingsError(f"{name}={raw!r}: use one of {', '.join(options)}")
    return raw


def _range(lo: object, hi: object) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _admin_key(home: Path) -> tuple[str, bool]:
    """The stored admin key, and whether this call generated it (then it is logged, once)."""
    path = home / "admin_key"
    if not path.exists():
        key = ADMIN_KEY_PREFIX + secrets.token_urlsafe(30)
        # Write a private temp file, then hard-link it into place: the link either creates the
        # complete file or fails because another process got there first (never a half key).
        tmp = home / f".admin_key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        else:
            log.warning(
                "TAILOR_ADMIN_KEY is not set: generated an admin key into %s (mode 0600). "
                "Admin key: %s  (logged this once; set TAILOR_ADMIN_KEY to choose your own)", path, key,
            )
            return key, True
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SettingsError(f"{path} is readable by others (mode {oct(mode)}); chmod 600 it")
    stored = path.read_text().strip()
    if len(stored) < MIN_ADMIN_KEY_CHARS:
        raise SettingsError(f"{path} does not hold a usable admin key; delete it to generate a new one")
    return stored, False
