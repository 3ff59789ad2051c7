"""Each served instance gets its own BentoML home, so its ``/metrics`` are its own.

BentoML 1.4 keeps a ``bentoml serve``'s multiprocess Prometheus files in
``$BENTOML_HOME/prometheus_multiproc_dir`` (``BENTOML_HOME`` defaults to ``~/bentoml``) and
empties that folder when it starts: two instances of one user on one host would read each
other's numbers, and starting one would wipe the other's. A ``PROMETHEUS_MULTIPROC_DIR`` in
the environment does not help: BentoML overwrites it from ``BENTOML_HOME``.

So every launcher of ours (``tailor serve`` and ``scripts/serve.sh``, ``deploy.local.cluster``,
the tests' fixture) sets ``BENTOML_HOME`` to ``instance_home(TAILOR_HOME, port)``:
``$TAILOR_HOME/instances/<host>-<port>``. No two live instances of one host share a port, so
none share the folder; restarting an instance on its port starts its own metrics afresh, as a
restarted process does, and touches nobody else's. Nothing else BentoML keeps there is used by
``bentoml serve`` of a service folder. In a container each instance has its own filesystem,
so images keep BentoML's default.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

DEFAULT_TAILOR_HOME = "./.tailor"
SHARED_DEFAULT_DIR = Path("~/bentoml/prometheus_multiproc_dir")


def tailor_home(env: Mapping[str, str]) -> Path:
    """``$TAILOR_HOME`` as the service resolves it (``./.tailor`` when unset), absolute."""
    return Path(env.get("TAILOR_HOME") or DEFAULT_TAILOR_HOME).expanduser().resolve()


def instance_home(home: Path, port: int, host: str | None = None) -> Path:
    """The BentoML home of the instance serving ``home`` on ``port`` of this host."""
    return home / "instances" / f"{host or socket.gethostname()}-{int(port)}"


def instance_env(env: Mapping[str, str], port: int) -> dict[str, str]:
    """``env`` with ``BENTOML_HOME`` set to this instance's own folder (created)."""
    path = instance_home(tailor_home(env), port)
    path.mkdir(parents=True, exist_ok=True)
    return {**env, "BENTOML_HOME": str(path)}


def shares_default_dir(env: Mapping[str, str] | None = None) -> bool:
    """Whether this serving process writes its metrics to the per-user default folder that
    every ``bentoml serve`` without its own ``BENTOML_HOME`` shares (and wipes)."""
    env = os.environ if env is None else env
    current = env.get("PROMETHEUS_MULTIPROC_DIR")
    if not current:
        return False
    return Path(current).expanduser().resolve() == SHARED_DEFAULT_DIR.expanduser().resolve()
