"""``tailor chat`` and ``tailor models`` against a real served process with text generation, and how
``tailor train`` / ``tailor files upload`` tell a local file's task from its data."""

from __future__ import annotations

import json
import zipfile

import pytest

from service import cli
from service.client import TailorClient
from tests.test_service_generation import admin, gbase, gen_zip, tenant  # noqa: F401 - fixtures
from tests.test_service_http import import_zip


@pytest.mark.parametrize("content, task", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n',
     "text-generation"),
    ('\n{"prompt": "2+2=", "completion": "4"}\n', "text-generation"),
    ('{"text": "great", "label": "pos"}\n', None),  # the server's default: text classification
    ('{"image": "iVBORw0KGgo=", "label": "shoe"}\n', "image-classification"),
    ("text,label\ngreat,pos\n", None),
    ("{not json\n", None),  # the upload names the broken line
])
def test_the_task_of_a_local_file_comes_from_its_data(tmp_path, content, task):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    assert cli._file_task(path, None) == task
    assert cli._file_task(path, "text-classification") == "text-classification"  # --task wins


def test_a_zip_trains_images_and_an_uploaded_file_id_is_left_to_the_server(tmp_path):
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        z.writestr("shoe/a.png", b"")
    assert cli._file_task(tmp_path / "photos.zip", None) == "image-classification"
    assert cli._file_task(tmp_path / "file-abc123", None) is None


@pytest.fixture(scope="module")
def chatter(served_generation, admin, gbase):  # noqa: F811
    _, key = tenant(admin, "cli")
    with served_generation.client(key) as c:
        assert import_zip(c, "bot", gen_zip(gbase, 7)).status_code == 201
    return key


def test_tailor_chat_streams_the_reply(served_generation, chatter, capsys):  # noqa: F811
    base = ["--url", served_generation.url, "--key", chatter]
    with TailorClient(served_generation.url, chatter) as client:
        whole = client.chat("bot", "Say hello.", max_tokens=8, temperature=0)
        pieces = list(client.chat_stream("bot", "Say hello.", max_tokens=8, temperature=0))
    text = whole["choices"][0]["message"]["content"]
    assert "".join(pieces) == text and len(pieces) > 1  # piece by piece, as generated
    assert cli.main([*base, "chat", "bot", "Say", "hello.", "--max-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert cli.main([*base, "chat", "bot", "Say hello.", "--max-tokens", "8", "--temperature", "0", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] == text
    assert cli.main([*base, "models"]) == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)] == ["bot", "tiny-llama-3"]
    assert cli.main([*base, "chat", "nobody", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 404 model_not_found") and "nobody" in err


def test_tailor_train_sends_chats_as_a_text_generation_job(served_generation, chatter, tmp_path, capsys):  # noqa: F811
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(12)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--url", served_generation.url, "--key", chatter]
    assert cli.main([*base, "train", "bot", str(path)]) == 0  # no --task: the task comes from the data
    job = json.loads(capsys.readouterr().out)
    assert job["task"] == "text-generation" and job["adapter"] == "bot" and job["status"] == "queued", job
    with TailorClient(served_generation.url, chatter) as client:
        assert client.get_file(job["training_file"])["task"] == "text-generation"
        client.cancel_job(job["id"])  # no training workers here: it would stay queued
