"""One place turns settings into a training worker's command line
(``adapters.jobs.supervisor.worker_args``): the serving pool's workers and ``tailor worker`` read
the same settings the same way, and the worker parses what it is given back to them."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from adapters.jobs.supervisor import worker_args, worker_command
from adapters.jobs.worker import parse_args
from service.settings import Settings


def settings(base_model: str | None = "/models/minilm") -> Settings:
    return Settings(home=Path("/srv/tailor"), admin_key="", base_model=base_model,
                    database_url="postgresql+psycopg://t@db/tailor", store_url="s3://b/p?region=x&y=1",
                    store_gc_hours=2.5)


def test_the_pool_command_runs_the_worker_module_with_the_settings() -> None:
    cmd = worker_command(settings(), threads=2)
    assert cmd[:3] == [sys.executable, "-m", "adapters.jobs.worker"]
    args = parse_args(cmd[3:])
    assert (args.database_url, args.store_url, args.base_model) == (
        "postgresql+psycopg://t@db/tailor", "s3://b/p?region=x&y=1", "/models/minilm")
    assert (args.checkpoints, args.gc_hours, args.threads) == (Path("/srv/tailor/checkpoints"), 2.5, 2)
    assert (args.nice, args.device, args.once) == (10, None, False)  # the worker's defaults: yields cores


def test_tailor_worker_options_pass_through_and_unset_ones_stay_the_workers() -> None:
    args = parse_args(worker_args(settings(base_model=None), threads=None, device="cpu", nice=0, once=True))
    assert (args.nice, args.device, args.once, args.threads, args.base_model) == (0, "cpu", True, None, None)
    assert args.checkpoints == Path("/srv/tailor/checkpoints") and args.gc_hours == 2.5


def test_the_tasks_and_the_image_base_reach_the_worker() -> None:
    args = parse_args(worker_args(settings(), threads=None))
    assert (args.tasks, args.image_base_model) == (("text-classification", "image-classification"), None)
    images_only = replace(settings(), tasks=("image-classification",), image_base_model="tiny:3")
    args = parse_args(worker_args(images_only, threads=None))
    assert (args.tasks, args.image_base_model) == (("image-classification",), "tiny:3")
    # given in any order, legacy names too: trained in the canonical order (text first)
    assert parse_args(["--database-url", "d", "--store-url", "s", "--checkpoints", "c", "--tasks",
                       "image-classification,classification"]).tasks == ("text-classification",
                                                                          "image-classification")
