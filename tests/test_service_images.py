"""Image tenants over real HTTP: one ``bentoml serve`` process (the session's ``served``) hosts a
tiny text base and a tiny vision base; text and image adapters of several tenants are served
side by side, each by its own engine, and every refusal names its cause. A second process,
started with ``TAILOR_TASKS=text-classification``, serves text only and says so for images.

No mocks: real HTTP, real SQLite and store, real image files made with Pillow.
"""

from __future__ import annotations

import base64
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from adapters.catalog import Catalog
from adapters.peft_format import TAILOR_FILE, export_peft, unzip_files, zip_files
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_image_artifact
from service.client import TailorAPIError, TailorClient
from tests.image_files import distinct, encode, image_folder, make_zip, png_header_only, solid
from tests.service_fixture import LIMITS, image_base, save_tiny_base
from tests.test_service_http import TEXTS, adapter_zip, admin, assert_error, import_zip, new_tenant, spec  # noqa: F401

TEXT, IMAGE = "text-classification", "image-classification"
MAX_IMAGES = int(LIMITS["TAILOR_MAX_IMAGES"])
MAX_IMAGE_BYTES = int(LIMITS["TAILOR_MAX_IMAGE_BYTES"])
MAX_IMAGE_PIXELS = int(LIMITS["TAILOR_MAX_IMAGE_PIXELS"])
# three different images: two PNGs of other sizes and a JPEG
IMAGES = [distinct(3, size=(24, 20)), distinct(40, size=(17, 31)), distinct(99, fmt="JPEG", size=(32, 32))]


def noise(side: int, seed: int) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about 3 * side**2 bytes."""
    pixels = random.Random(seed).randbytes(side * side * 3)
    return encode(Image.frombytes("RGB", (side, side), pixels), "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_zip(vspec, seed: int, n_labels: int = 3, *, manifest: bool = True) -> bytes:
    files = export_peft(random_image_artifact(vspec, seed=seed, n_labels=n_labels), vspec)
    if not manifest:  # a plain peft adapter: no Tailor manifest names its task or base
        files.pop(TAILOR_FILE)
    return zip_files(files)


def predict_images(client: httpx.Client, adapter: str, images: list[bytes]) -> httpx.Response:
    return client.post("/v1/predict", json={"adapter": adapter, "images": [b64(x) for x in images]})


def predict_form(client: httpx.Client, adapter: str, images: list[bytes]) -> httpx.Response:
    files = [("images", (f"img{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    return client.post("/v1/predict", data={"adapter": adapter}, files=files)


@pytest.fixture(scope="module")
def vision():
    return image_base()  # the served process's vision base, built here from the same seed


@pytest.fixture(scope="module")
def tenants(served, admin, spec, vision):  # noqa: F811
    """Two tenants: ``a`` has text adapter ``clf`` and image adapter ``photos`` (3 labels), ``b``
    an image adapter also named ``photos`` (2 labels). Returns {name: (key, {adapter: zip})}."""
    made = {}
    for name, adapters in (("a", {"clf": adapter_zip(spec, seed=1, n_labels=3),
                                  "photos": image_zip(vision.spec, seed=2, n_labels=3)}),
                           ("b", {"photos": image_zip(vision.spec, seed=3, n_labels=2)})):
        tenant, key = new_tenant(admin, f"img{name}")
        with served.client(key) as c:
            for adapter, data in adapters.items():
                r = import_zip(c, adapter, data)
                assert r.status_code == 201, r.text
                assert r.json()["task"] == (IMAGE if adapter == "photos" else TEXT), r.json()
        made[name] = (key, adapters)
    return made


def local_predictions(tmp_path: Path, base, data: bytes, raw: list) -> list:
    """What an engine in this process, on the same base, answers for adapter zip ``data``."""
    from adapters.peft_format import import_peft

    tmp_path.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/local.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("local")
    catalog.publish("local", "x", import_peft(unzip_files(data, max_bytes=1 << 24), base.spec), promote=True,
                    spec=base.spec)
    engine = Engine(base, catalog, EngineConfig(max_resident=4, device_slots=9, max_batch_size=8))
    loaded = engine.acquire(engine.resolve("local", "x"))
    return engine.predict_rows(engine.decode_rows(raw), [loaded] * len(raw))


def assert_same(remote: list[dict], local: list) -> None:
    assert len(remote) == len(local)
    for got, want in zip(remote, local):
        assert got["label"] == want.label and set(got["scores"]) == set(want.scores)
        assert all(abs(got["scores"][k] - v) < 1e-5 for k, v in want.scores.items()), (got, want)


# -- one process, both tasks ------------------------------------------------------------------------

def test_text_and_image_tenants_are_served_by_one_process_without_cross_talk(served, tenants, tmp_path):  # noqa: F811
    from adapters.base import load_base

    (key_a, zips_a), (key_b, zips_b) = tenants["a"], tenants["b"]
    want = {
        ("a", "photos"): local_predictions(tmp_path / "a", image_base(), zips_a["photos"], IMAGES),
        ("b", "photos"): local_predictions(tmp_path / "b", image_base(), zips_b["photos"], IMAGES),
        ("a", "clf"): local_predictions(tmp_path / "t", load_base(str(served.model_dir)), zips_a["clf"], TEXTS),
    }
    assert len(want[("a", "photos")][0].scores) == 3 and len(want[("b", "photos")][0].scores) == 2

    def one(i: int) -> tuple[tuple[str, str], httpx.Response]:
        which = [("a", "photos"), ("b", "photos"), ("a", "clf")][i % 3]
        key = key_a if which[0] == "a" else key_b
        with served.client(key) as c:
            if which[1] == "clf":
                return which, c.post("/v1/predict", json={"adapter": "clf", "inputs": TEXTS})
            return which, predict_images(c, "photos", IMAGES)

    with ThreadPoolExecutor(12) as pool:  # concurrent: rows of both tenants share image batches
        answers = list(pool.map(one, range(24)))
    for which, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == which[1] and r.json()["version"] == 1
        assert_same(r.json()["predictions"], want[which])

    with served.client(key_a) as c:
        listed = {a["name"]: a["task"] for a in c.get("/v1/adapters").json()}
        assert listed == {"clf": TEXT, "photos": IMAGE}
        detail = c.get("/v1/adapters/photos").json()
        assert detail["task"] == IMAGE and [v["task"] for v in detail["versions"]] == [IMAGE]
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'tailor_predict_rows_total{task="image-classification"}' in metrics
    assert 'tailor_batch_size_count{task="image-classification"}' in metrics


def test_json_multipart_data_urls_and_the_client_give_the_same_answer(served, tenants, tmp_path):  # noqa: F811
    key, _ = tenants["a"]
    with served.client(key) as c:
        by_json = predict_images(c, "photos", IMAGES)
        assert by_json.status_code == 200, by_json.text
        by_form = predict_form(c, "photos", IMAGES)
        assert by_form.status_code == 200, by_form.text
        data_urls = c.post("/v1/predict", json={"adapter": "photos",
                                                "images": [f"data:image/png;base64,{b64(x)}" for x in IMAGES]})
        assert data_urls.status_code == 200, data_urls.text
    assert by_json.json() == by_form.json() == data_urls.json()
    (tmp_path / "first.png").write_bytes(IMAGES[0])
    with TailorClient(served.url, key) as client:
        assert client.predict("photos", images=[tmp_path / "first.png", *IMAGES[1:]]) == by_json.json()
        with pytest.raises(ValueError, match="not both"):
            client.predict("photos", ["text"], images=IMAGES)


# -- refusals --------------------------------------------------------------------------------------

def test_inputs_for_another_task_are_422s_naming_the_adapters_task(served, tenants):  # noqa: F811
    key, _ = tenants["a"]
    with served.client(key) as c:
        err = assert_error(predict_images(c, "clf", IMAGES[:1]), 422, "task_mismatch", "images")
        assert "text-classification" in err["message"] and "send inputs" in err["message"], err
        err = assert_error(predict_form(c, "clf", IMAGES[:1]), 422, "task_mismatch", "images")
        err = assert_error(c.post("/v1/predict", json={"adapter": "photos", "inputs": ["a photo?"]}), 422,
                           "task_mismatch", "inputs")
        assert "image-classification" in err["message"] and "send images" in err["message"], err
        both = {"adapter": "photos", "inputs": ["x"], "images": [b64(IMAGES[0])]}
        assert "not both" in assert_error(c.post("/v1/predict", json=both), 422, "invalid_request")["message"]
        assert_error(c.post("/v1/predict", json={"adapter": "photos"}), 422, "invalid_request", "inputs")
        assert_error(c.post("/v1/predict", json={"adapter": "photos", "images": []}), 422, "invalid_request", "images")
        assert_error(c.post("/v1/predict", json={"adapter": "photos", "images": [1]}), 422, "invalid_request",
                     "images[0]")
        assert_error(c.post("/v1/predict", data={"adapter": "photos", "nope": "1"}, files=[("images", b"x")]), 422,
                     "invalid_request", "nope")
        assert_error(c.post("/v1/predict", files=[("images", IMAGES[0])]), 422, "invalid_request", "adapter")
        assert_error(c.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}),
                     400, "invalid_json")
        assert_error(c.post("/v1/predict", content=b"adapter=photos",
                            headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
        assert_error(predict_images(c, "nothing", IMAGES[:1]), 404)
    with served.client(tenants["b"][0]) as c:  # tenant b has no text adapter 'clf': never another tenant's
        assert_error(c.post("/v1/predict", json={"adapter": "clf", "inputs": ["x"]}), 404)


def test_image_limits_and_bad_images_name_the_limit_and_the_image(served, tenants):  # noqa: F811
    key, _ = tenants["a"]
    big = noise(160, seed=1)
    assert len(big) > MAX_IMAGE_BYTES
    wide = solid((10, 20, 30), size=(1100, 1000))  # few bytes, too many pixels
    assert len(wide) < MAX_IMAGE_BYTES and 1100 * 1000 > MAX_IMAGE_PIXELS
    corrupt = IMAGES[0][: len(IMAGES[0]) // 2]
    with served.client(key) as c:
        err = assert_error(predict_images(c, "photos", [IMAGES[0]] * (MAX_IMAGES + 1)), 422, "too_many_images",
                           "images")
        assert str(MAX_IMAGES) in err["message"]
        for send in (predict_images, predict_form):
            err = assert_error(send(c, "photos", [IMAGES[0], big]), 413, "image_too_large", "images[1]")
            assert f"{MAX_IMAGE_BYTES:,}" in err["message"], err
            err = assert_error(send(c, "photos", [wide]), 413, "image_too_large", "images[0]")
            assert f"{MAX_IMAGE_PIXELS:,}" in err["message"], err
            assert_error(send(c, "photos", [png_header_only(40_000, 40_000)]), 413, "image_too_large", "images[0]")
            err = assert_error(send(c, "photos", [IMAGES[1], corrupt]), 422, "invalid_input", "images[1]")
            assert "truncated or corrupt" in err["message"], err
            err = assert_error(send(c, "photos", [b"GIF89a not really"]), 422, "invalid_input", "images[0]")
        bad = {"adapter": "photos", "images": [b64(IMAGES[0]), "not base64!"]}
        assert "base64" in assert_error(c.post("/v1/predict", json=bad), 422, "invalid_input", "images[1]")["message"]
        # several images near the byte limit fit in one body (the predict body limit makes room)
        near = [noise(140, seed=i) for i in range(MAX_IMAGES)]
        assert all(len(x) <= MAX_IMAGE_BYTES for x in near) and sum(len(x) for x in near) * 4 / 3 > 100_000
        r = predict_images(c, "photos", near)
        assert r.status_code == 200 and len(r.json()["predictions"]) == MAX_IMAGES, r.text
        assert predict_images(c, "photos", IMAGES).status_code == 200  # nothing stuck behind the refusals


# -- import and export --------------------------------------------------------------------------------

def test_import_goes_to_the_adapters_task_and_export_round_trips(served, admin, spec, vision):  # noqa: F811
    _, key = new_tenant(admin, "imp")
    with served.client(key) as c:
        # a plain peft zip (no Tailor manifest): its saved head (_fc) says image
        r = import_zip(c, "plain", image_zip(vision.spec, seed=7, manifest=False))
        assert r.status_code == 201 and r.json()["task"] == IMAGE, r.text
        assert predict_images(c, "plain", IMAGES[:1]).status_code == 200
        # the next version of an image adapter is an image adapter; a text zip there is refused
        assert import_zip(c, "plain", image_zip(vision.spec, seed=8, manifest=False)).json()["version"] == 2
        err = assert_error(import_zip(c, "plain", adapter_zip(spec, seed=9)), 409, "adapter_task_mismatch", "task")
        assert IMAGE in err["message"] and TEXT in err["message"], err
        # an explicit task that the zip's manifest contradicts, or that is unknown
        assert_error(import_zip(c, "other", image_zip(vision.spec, seed=10), task=TEXT), 422)
        assert_error(import_zip(c, "other", image_zip(vision.spec, seed=10), task="audio"), 422, param="task")
        r = import_zip(c, "other", image_zip(vision.spec, seed=10, manifest=False), task=IMAGE)
        assert r.status_code == 201 and r.json()["task"] == IMAGE, r.text

        exported = c.get("/v1/adapters/plain/export", params={"version": "1"})
        assert exported.status_code == 200 and exported.headers["content-type"] == "application/zip"
        assert json.loads(unzip_files(exported.content, max_bytes=1 << 24)[TAILOR_FILE])["task"] == IMAGE
        r = import_zip(c, "copy", exported.content)
        assert r.status_code == 201 and r.json()["task"] == IMAGE
        same = [predict_images(c, name, IMAGES).json()["predictions"] for name in ("plain@1", "copy")]
        assert same[0] == same[1]


# -- files and jobs ------------------------------------------------------------------------------------

def test_image_files_and_jobs(served, admin):  # noqa: F811
    _, key = new_tenant(admin, "imgdata")
    photos = make_zip(image_folder({"cat": 3, "dog": 3}))
    with served.client(key) as c:
        err = assert_error(c.post("/v1/files", files={"file": ("photos.zip", photos)}), 422, "invalid_dataset", "task")
        assert "task=image-classification" in err["message"], err
        r = c.post("/v1/files", files={"file": ("photos.zip", photos)}, data={"task": IMAGE})
        assert r.status_code == 201, r.text
        f = r.json()
        assert (f["task"], f["rows"], f["labels"], f["format"]) == (IMAGE, 6, ["cat", "dog"], "zip")
        text = c.post("/v1/files", files={"file": ("t.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", '
                                                             b'"label": "x"}\n{"text": "c", "label": "y"}\n'
                                                             b'{"text": "d", "label": "y"}\n')})
        assert text.status_code == 201 and text.json()["task"] == TEXT, text.text
        assert {x["id"]: x["task"] for x in c.get("/v1/files").json()} == {f["id"]: IMAGE, text.json()["id"]: TEXT}
        assert_error(c.post("/v1/files", files={"file": ("p.zip", photos)}, data={"task": "audio"}), 422,
                     param="task")
        r = c.post("/v1/jobs", json={"adapter": "pets", "training_file": f["id"], "hyperparameters": {"epochs": 1}})
        assert r.status_code == 201, r.text
        assert r.json()["task"] == IMAGE and r.json()["status"] == "queued"
        assert c.get(f"/v1/jobs/{r.json()['id']}").json()["task"] == IMAGE


# -- a text-only deployment -------------------------------------------------------------------------------

def test_a_text_only_service_serves_text_and_says_so_for_images(served_text_only, vision):
    from adapters.base import load_base

    s = served_text_only  # TAILOR_TASKS=text-classification, TAILOR_IMAGE_BASE_MODEL=""
    home = s.home
    tspec = load_base(str(s.model_dir)).spec
    with s.client(s.admin_key) as adm:
        tenant, key = new_tenant(adm, "textonly")
    # an image adapter in its registry (published through the library, as training would)
    catalog = Catalog(Registry(f"sqlite:///{home / 'tailor.db'}"), LocalStore(home / "store"))
    catalog.publish(tenant, "photos", random_image_artifact(vision.spec, seed=4), promote=True, spec=vision.spec)
    with s.client(key) as c:
        assert import_zip(c, "clf", adapter_zip(tspec, seed=5)).status_code == 201
        assert c.post("/v1/predict", json={"adapter": "clf", "inputs": TEXTS}).status_code == 200
        err = assert_error(predict_images(c, "photos", IMAGES[:1]), 422, "task_not_served", "adapter")
        assert "image-classification" in err["message"] and "serves text-classification" in err["message"]
        assert_error(c.post("/v1/predict", json={"adapter": "photos", "inputs": ["x"]}), 422, "task_not_served")
        err = assert_error(predict_images(c, "clf", IMAGES[:1]), 422, "task_mismatch", "images")
        assert "send inputs" in err["message"], err
        assert_error(import_zip(c, "pics", image_zip(vision.spec, seed=6)), 422, "task_not_served", "task")
        photos = make_zip(image_folder({"cat": 2, "dog": 2}))
        assert_error(c.post("/v1/files", files={"file": ("p.zip", photos)}, data={"task": IMAGE}), 422,
                     "task_not_served", "task")
        assert_error(c.get("/v1/adapters/photos/export"), 422, "task_not_served")
        assert {a["name"]: a["task"] for a in c.get("/v1/adapters").json()} == {"clf": TEXT, "photos": IMAGE}
    with TailorClient(s.url, key) as client, pytest.raises(TailorAPIError) as e:
        client.predict("photos", images=[IMAGES[0]])
    assert e.value.status == 422 and e.value.code == "task_not_served"
    metrics = httpx.get(f"{s.url}/metrics").text
    assert 'task="text-classification"' in metrics and 'task="image-classification"' not in metrics
    assert "loaded image-classification base" not in (s.home / "serve.log").read_text(errors="replace")


# -- the command line ------------------------------------------------------------------------------------

def test_the_cli_predicts_images_and_uploads_image_zips(served, admin, vision, tmp_path, capsys, monkeypatch):  # noqa: F811
    from service.cli import main

    _, key = new_tenant(admin, "imgcli")
    monkeypatch.setenv("TAILOR_URL", served.url)
    monkeypatch.setenv("TAILOR_API_KEY", key)
    (tmp_path / "pics.zip").write_bytes(image_zip(vision.spec, seed=12, n_labels=2, manifest=False))
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    for path, data in zip(paths, IMAGES[::2]):
        path.write_bytes(data)
    (tmp_path / "photos.zip").write_bytes(make_zip(image_folder({"cat": 3, "dog": 3})))

    def run(*argv: str) -> str:
        assert main(list(argv)) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    assert json.loads(run("adapters", "import", "pics", str(tmp_path / "pics.zip")))["task"] == IMAGE
    answer = json.loads(run("predict", "pics", "--image", *map(str, paths)))
    with served.client(key) as c:
        assert answer == predict_images(c, "pics", IMAGES[::2]).json()
    lines = run("predict", "pics", "--tsv", "--image", *map(str, paths)).splitlines()
    assert lines[0] == "# pics@1" and [line.split("\t")[2] for line in lines[1:]] == list(map(str, paths))
    assert main(["predict", "pics"]) == 1 and "--image" in capsys.readouterr().err  # neither texts nor images
    assert main(["predict", "pics", "some text", "--image", str(paths[0])]) == 1
    assert "not both" in capsys.readouterr().err

    uploaded = json.loads(run("files", "upload", str(tmp_path / "photos.zip")))  # a .zip: images
    assert (uploaded["task"], uploaded["rows"]) == (IMAGE, 6)
    job = json.loads(run("train", "pets", str(tmp_path / "photos.zip"), "--hp", "epochs=1"))
    assert job["task"] == IMAGE and job["status"] == "queued"
    assert main(["files", "upload", str(tmp_path / "photos.zip"), "--task", TEXT]) == 1
    assert "task=image-classification" in capsys.readouterr().err


# -- start-up ---------------------------------------------------------------------------------------------

def test_an_unsupported_vision_checkpoint_keeps_the_service_unready_and_says_why(tmp_path):
    from service.errors import ApiError
    from service.settings import Settings
    from service.state import TailorState

    checkpoint = tmp_path / "resnet"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"architecture": "resnet50"}')
    settings = Settings.from_env({
        "TAILOR_HOME": str(tmp_path / "home"), "TAILOR_ADMIN_KEY": "k" * 20, "TAILOR_TRAIN_WORKERS": "0",
        "TAILOR_BASE_MODEL": str(save_tiny_base(tmp_path / "model")), "TAILOR_IMAGE_BASE_MODEL": str(checkpoint)})
    state = TailorState.open(settings)
    try:
        state.load()  # the text base loads; the vision checkpoint is refused
        assert not state.ready and "resnet50" in (state.load_error or "")
        for task in (TEXT, IMAGE):  # ready means every enabled base: nothing is served half-way
            with pytest.raises(ApiError) as e:
                state.require_engine(task)
            assert e.value.status == 503 and "unsupported vision architecture 'resnet50'" in e.value.message
    finally:
        state.close()
