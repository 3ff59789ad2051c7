"""Checkpoints shared through the store (LocalStore and S3 on moto): a job resumes on any worker,
a torn pair is refused, a store outage costs resumability but never raises."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters.jobs import shared_checkpoints
from adapters.store import AdapterStore, LocalStore, open_store
from adapters.training import checkpoint
from tests.s3 import TcpProxy, moto_endpoint, s3_env, s3_url  # noqa: F401 - fixtures

FP = "fingerprint-of-the-run"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AdapterStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    s3 = open_store(s3_url(request.getfixturevalue("s3_env")))
    yield s3
    s3.close()  # type: ignore[attr-defined]


def save_epoch(folder: Path, epoch: int) -> dict[str, torch.Tensor]:
    tensors = {"param.w": torch.full((4, 3), float(epoch)), "exp_avg.w": torch.randn(4, 3)}
    checkpoint.save(folder, {"fingerprint": FP, "epoch": epoch, "history": [{"epoch": epoch}]}, tensors)
    return tensors


def test_a_shared_checkpoint_resumes_on_another_worker(store, tmp_path):
    node_a, node_b = tmp_path / "a" / "job-1", tmp_path / "b" / "job-1"
    assert not shared_checkpoints.fetch(store, "acme", "job-1", node_b), "nothing shared yet"
    save_epoch(node_a, 1)
    assert shared_checkpoints.share(store, "acme", "job-1", node_a)
    tensors = save_epoch(node_a, 2)
    assert shared_checkpoints.share(store, "acme", "job-1", node_a)  # each epoch replaces the last

    assert shared_checkpoints.fetch(store, "acme", "job-1", node_b)
    got = checkpoint.load(node_b, FP)
    assert got is not None and got.meta["epoch"] == 2
    assert torch.equal(got.tensors["param.w"], tensors["param.w"])
    assert sorted(p.name for p in node_b.iterdir()) == sorted([checkpoint.TENSORS, checkpoint.STATE])

    # a worker that has its own checkpoint keeps it
    save_epoch(node_b, 5)
    assert not shared_checkpoints.fetch(store, "acme", "job-1", node_b)
    assert checkpoint.load(node_b, FP).meta["epoch"] == 5  # type: ignore[union-attr]

    # other tenants' and jobs' checkpoints are apart; the job's end removes only its own
    save_epoch(tmp_path / "other", 1)
    assert shared_checkpoints.share(store, "globex", "job-1", tmp_path / "other")
    shared_checkpoints.discard(store, "acme", "job-1")
    assert store.list(shared_checkpoints.prefix("acme", "job-1")) == []
    assert not shared_checkpoints.fetch(store, "acme", "job-1", tmp_path / "c" / "job-1")
    assert shared_checkpoints.fetch(store, "globex", "job-1", tmp_path / "d" / "job-1")
    # under the tenant's prefix: deleting the tenant's objects takes them along
    assert store.delete_prefix("tenants/globex/") == 2


def test_a_torn_pair_is_refused_not_resumed(store, tmp_path):
    """A worker that died between the two uploads leaves epoch 2's tensors beside epoch 1's
    state: the fetched pair must not load (train from scratch, never with the wrong weights)."""
    folder = tmp_path / "a" / "job-2"
    save_epoch(folder, 1)
    assert shared_checkpoints.share(store, "acme", "job-2", folder)
    save_epoch(folder, 2)
    store.put(shared_checkpoints.prefix("acme", "job-2") + checkpoint.TENSORS,
              (folder / checkpoint.TENSORS).read_bytes())  # ... and the JSON never followed
    fetched = tmp_path / "b" / "job-2"
    assert shared_checkpoints.fetch(store, "acme", "job-2", fetched)
    assert checkpoint.load(fetched, FP) is None


def test_an_unwritable_store_costs_sharing_not_the_job(tmp_path):
    store = LocalStore(tmp_path / "store")
    (tmp_path / "store").rmdir()
    (tmp_path / "store").write_text("the volume went away")  # nothing can be written under it
    folder = tmp_path / "job-3"
    save_epoch(folder, 1)
    assert shared_checkpoints.share(store, "acme", "job-3", folder) is False


def test_an_s3_outage_costs_sharing_not_the_job(s3_env, tmp_path):  # noqa: F811 - fixture
    with TcpProxy.to(s3_env) as proxy:
        store = open_store(s3_url(proxy.url))
        folder = tmp_path / "a" / "job-4"
        save_epoch(folder, 1)
        assert shared_checkpoints.share(store, "acme", "job-4", folder)
        proxy.mode = "reset"
        assert shared_checkpoints.share(store, "acme", "job-4", folder) is False
        assert shared_checkpoints.fetch(store, "acme", "job-4", tmp_path / "b" / "job-4") is False
        shared_checkpoints.discard(store, "acme", "job-4")  # logged, not raised
        proxy.mode = "forward"
        assert shared_checkpoints.fetch(store, "acme", "job-4", tmp_path / "c" / "job-4")
        store.close()  # type: ignore[attr-defined]
