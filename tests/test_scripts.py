"""``scripts/system-packages.sh`` (run by ``scripts/test.sh``) says what it would install and why.

It used to install Debian packages without a word. Run here with ``--dry-run`` only: it must
never install anything from the test suite.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system-packages.sh"
PACKAGES = ("postgresql", "nginx", "kubernetes-client", "dataset-fashion-mnist", "chromium")


def dry_run(path: str | None = None) -> tuple[int, list[str]]:
    env = {"PATH": path} if path is not None else None
    done = subprocess.run(["/bin/bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env=env)
    return done.returncode, done.stderr.splitlines()


def test_each_package_is_named_with_the_tests_that_need_it() -> None:
    rc, lines = dry_run()
    assert rc == 0
    for pkg in PACKAGES:
        line = next((x for x in lines if x.startswith(f"system-packages: {pkg}: ")), None)
        assert line is not None and "tests/test_" in line, (pkg, lines)


def test_missing_programs_are_named_and_a_dry_run_installs_nothing(tmp_path: Path) -> None:
    rc, lines = dry_run(path=str(tmp_path))  # an empty PATH: kubectl cannot be found
    assert rc == 0
    assert "system-packages: kubernetes-client: missing, needed for kubectl, which renders deploy/k8s: " \
           "tests/test_k8s.py" in lines, lines
    assert any(x.startswith("system-packages: not installing ") and "kubernetes-client" in x and "dry run" in x
               for x in lines), lines
