"""What the CLI prints is what the README says: JSON on stdout, every group alone lists, and
``tailor`` is where the README says it is.

Against a real ``bentoml serve`` (the session's ``served``), with ``service.cli.main`` called in
this process as a shell would call it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.base import load_base
from adapters.peft_format import export_peft, zip_files
from adapters.synthetic import random_artifact
from service.cli import main
from tests.service_fixture import Served


@pytest.fixture(scope="module")
def tenant(served: Served, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    """A tenant's key; it has adapter 'mood' (labels sad, happy) and one uploaded file."""
    from service.client import TailorClient

    with TailorClient(served.url, served.admin_key) as admin:
        key = admin.create_tenant("cliout")["api_key"]
    spec = load_base(str(served.model_dir)).spec
    folder = tmp_path_factory.mktemp("cliout")
    (folder / "a.zip").write_bytes(zip_files(export_peft(random_artifact(spec, seed=4, n_labels=2), spec)))
    (folder / "rows.jsonl").write_text("".join(
        json.dumps({"text": f"text number {i}", "label": ("sad", "happy")[i % 2]}) + "\n" for i in range(12)))
    with TailorClient(served.url, key) as c:
        c.import_adapter("mood", folder / "a.zip", labels=["sad", "happy"])
        c.upload_file(folder / "rows.jsonl")
    return key


def stdout_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.fixture
def cli(served: Served, tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("TAILOR_URL", served.url)
    monkeypatch.setenv("TAILOR_API_KEY", tenant)


@pytest.mark.parametrize("group", ["files", "jobs", "adapters"])
def test_a_group_alone_lists_like_its_list_command(cli, capsys, group: str) -> None:
    alone = json.loads(stdout_of(capsys, [group]))
    assert isinstance(alone, list) and alone == json.loads(stdout_of(capsys, [group, "list"]))
    if group != "jobs":
        assert alone, f"the tenant has {group}"


def test_tenants_alone_lists_for_the_admin(served: Served, capsys) -> None:  # noqa: F811
    names = [t["name"] for t in json.loads(stdout_of(capsys, ["--url", served.url, "--key", served.admin_key,
                                                               "tenants"]))]
    assert "cliout" in names


def test_stdout_is_json(cli, capsys, tmp_path: Path) -> None:
    answer = json.loads(stdout_of(capsys, ["predict", "mood", "what a day", "oh no"]))
    assert answer["adapter"] == "mood" and [p["label"] in ("sad", "happy") for p in answer["predictions"]] == [True] * 2
    assert json.loads(stdout_of(capsys, ["predict", "mood", "x", "--json"])) == json.loads(
        stdout_of(capsys, ["predict", "mood", "x"]))  # --json, the old way to ask, still works
    out = tmp_path / "mood.zip"
    wrote = json.loads(stdout_of(capsys, ["adapters", "export", "mood", "-o", str(out)]))
    assert wrote == {"adapter": "mood", "version": "prod", "path": str(out), "bytes": out.stat().st_size}
    detail = json.loads(stdout_of(capsys, ["adapters", "show", "mood"]))
    assert [v["status"] for v in detail["versions"]] == ["prod"]


def test_tsv_when_asked(cli, capsys) -> None:
    lines = stdout_of(capsys, ["predict", "mood", "what a day", "--tsv"]).splitlines()
    assert lines[0] == "# mood@1" and lines[1].split("\t")[0] in ("sad", "happy")
    assert lines[1].endswith("\twhat a day") and len(lines) == 2


def test_tailor_is_installed_next_to_python() -> None:
    """The README says the scripts install ``tailor`` into .venv/bin (activate to use it bare)."""
    exe = Path(sys.executable).parent / "tailor"
    assert exe.is_file(), f"{exe} is missing: pip install -e . (scripts/setup.sh) installs it"
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "serve" in done.stdout and "files" in done.stdout
