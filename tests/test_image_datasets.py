"""adapters.vision.image_datasets and adapters.vision.zip_upload: uploaded image datasets."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from adapters.datasets import DatasetLimits, stratified_split, Dataset, Example
from adapters.errors import DatasetError
from adapters.vision.image_datasets import (
    ImageDataset, ImageDatasetLimits, ImageExample, parse_image_dataset, stratified_image_split,
)
from adapters.vision.images import ImageLimits
from adapters.vision.zip_upload import ZipLimits, ZipProblem, ZipUpload
from tests.image_files import distinct, encode, image_folder, make_zip, png_header_only, solid

GOOD = image_folder({"dog": 3, "cat": 2})


def refused(data: bytes, param: str, *, limits: ImageDatasetLimits = ImageDatasetLimits(),
            format: str | None = None) -> str:
    with pytest.raises(DatasetError) as caught:
        parse_image_dataset(data, limits=limits, format=format)
    assert caught.value.param == param, caught.value.message
    return caught.value.message


def jsonl(rows: list[object]) -> bytes:
    return "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def with_info(name: str, **attributes: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    for key, value in attributes.items():
        setattr(info, key, value)
    return info


# --- accepted --------------------------------------------------------------------------------


def test_a_zip_of_label_folders_is_accepted() -> None:
    members = {**GOOD, "cat/gray.jpg": solid(90, (30, 20), "JPEG", "L"),
               "cat/alpha.png": solid((10, 20, 30, 40), mode="RGBA"),
               "dog/cmyk.jpg": solid((1, 2, 3, 4), (9, 9), "JPEG", "CMYK"),
               "__MACOSX/cat/._000.png": b"junk", "cat/.DS_Store": b"junk", "dog/Thumbs.db": b"junk"}
    ds = parse_image_dataset(make_zip(members))
    assert ds.labels == ("cat", "dog") and ds.counts() == {"cat": 4, "dog": 4} and len(ds) == 8
    assert ds.duplicates_dropped == 0
    assert ds.examples[0] == ImageExample(GOOD["dog/000.png"], "dog", "member 'dog/000.png'")
    assert ds.label_ids()[:3] == [1, 1, 1]
    assert all(ds.image(i).mode == "RGB" for i in range(len(ds)))


def test_one_enclosing_folder_is_looked_through() -> None:
    folders = {"photos/": b"", "photos/a/": b"", "photos/b/": b""}  # what `zip -r` adds
    ds = parse_image_dataset(make_zip({**folders, **image_folder({"a": 2, "b": 2}, prefix="photos/")}))
    assert ds.labels == ("a", "b") and ds.examples[0].source == "member 'photos/a/000.png'"


def test_jsonl_is_accepted_and_matches_the_zip() -> None:
    rows = [{"image": b64(data), "label": name.split("/")[0]} for name, data in GOOD.items()]
    rows[0]["image"] = "data:image/png;base64," + rows[0]["image"]
    from_lines = parse_image_dataset(b"\xef\xbb\xbf" + jsonl([*rows[:2], "  ", *rows[2:]]))
    from_zip = parse_image_dataset(make_zip(GOOD))
    assert from_lines.labels == from_zip.labels and from_lines.counts() == from_zip.counts()
    assert [e.data for e in from_lines.examples] == [e.data for e in from_zip.examples]
    assert from_lines.examples[2].source == "line 4"
    numbered = parse_image_dataset(jsonl([{"image": b64(distinct(i)), "label": i % 2} for i in range(4)]))
    assert numbered.labels == ("0", "1")


def test_repeated_images_with_the_same_label_are_dropped_and_counted() -> None:
    members = {**GOOD, "cat/again.bmp": encode(Image.open(io.BytesIO(GOOD["cat/000.png"])), "BMP")}
    ds = parse_image_dataset(make_zip(members))
    assert ds.duplicates_dropped == 1 and ds.counts() == {"cat": 2, "dog": 3}


def test_split_is_the_text_split() -> None:
    ds = parse_image_dataset(make_zip(image_folder({"a": 7, "b": 5, "c": 3})))
    train, validation = stratified_image_split(ds, fraction=0.3, seed=4)
    text = Dataset(tuple(Example(e.source, e.label) for e in ds.examples), ds.labels)
    text_train, text_validation = stratified_split(text, fraction=0.3, seed=4)
    assert [e.source for e in validation.examples] == [e.text for e in text_validation.examples]
    assert [e.source for e in train.examples] == [e.text for e in text_train.examples]
    assert isinstance(train, ImageDataset) and validation.labels == ds.labels
    assert stratified_image_split(ds, fraction=0.3, seed=4) == (train, validation)


# --- refusals: the zip's structure -----------------------------------------------------------


@pytest.mark.parametrize(("name", "problem"), [
    ("../evil.png", "escapes the archive ('..' in its path)"),
    ("cat/../../evil.png", "escapes the archive ('..' in its path)"),
    ("/etc/evil.png", "is an absolute path; members must be relative"),
    ("C:/evil.png", "is an absolute path; members must be relative"),
    ("cat\\..\\evil.png", "has a backslash in its path; zip paths use '/'"),
    ("cat//evil.png", "has an empty or '.' segment in its path"),
    ("cat/\x1bevil.png", "has a control character in its path"),
])
def test_unsafe_member_names_are_refused_and_nothing_is_written(
    name: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    data = make_zip([*GOOD.items(), (name, solid((9, 9, 9)))])
    shown = repr(name)
    assert refused(data, f"member {shown}") == f"training file member {shown} {problem}"
    assert sorted(tmp_path.rglob("*")) == before


def test_symlinks_special_files_and_encrypted_members_are_refused() -> None:
    link = with_info("cat/link.png", create_system=3, external_attr=(stat.S_IFLNK | 0o777) << 16)
    message = refused(make_zip([*GOOD.items(), (link, b"/etc/passwd")]), "member 'cat/link.png'")
    assert message.endswith("is a symbolic link; only regular files and folders are allowed")
    fifo = with_info("cat/fifo.png", create_system=3, external_attr=(stat.S_IFIFO | 0o644) << 16)
    assert refused(make_zip([(fifo, b"x")]), "member 'cat/fifo.png'").endswith("is not a regular file or folder")
    locked = bytearray(make_zip({"cat/secret.png": distinct(1)}))  # zipfile cannot write encrypted
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        at = locked.index(signature) + offset
        locked[at] |= 0x1  # general purpose flag bit 0: encrypted
    assert refused(bytes(locked), "member 'cat/secret.png'").endswith("is encrypted; upload an unencrypted zip")


def test_repeated_member_names_are_refused() -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = make_zip([*GOOD.items(), ("cat/000.png", distinct(99))])
    assert refused(data, "member 'cat/000.png'").endswith("appears twice in the zip")


def test_layout_problems_are_refused() -> None:
    assert refused(make_zip({**GOOD, "loose.png": distinct(50)}), "member 'loose.png'") == (
        "training file member 'loose.png' is not in a label folder; put each image in a folder named "
        "after its label (label/image.jpg, optionally all inside one folder)")
    deep = make_zip({**GOOD, "cat/x/1.png": distinct(51)})
    assert "'cat/x/1.png' is nested too deeply; put each image" in refused(deep, "member 'cat/x/1.png'")
    assert refused(make_zip({"cat/": b"", "__MACOSX/x": b""}), "file") == (
        "training file has no images; expected folders named after the labels, each holding that "
        "label's images (label/image.jpg)")
    long_label = "x" * 129
    message = refused(make_zip({**GOOD, f"{long_label}/1.png": distinct(52)}), f"member '{long_label}/1.png'")
    assert message.endswith(": its folder name (the label) is 129 characters; the limit is 128")


def test_member_and_size_quotas_are_refused() -> None:
    small = ImageDatasetLimits(max_members=4)
    assert refused(make_zip(GOOD), "file", limits=small) == "training file has 5 zip entries; the limit is 4"
    few = ImageDatasetLimits(dataset=DatasetLimits(max_rows=4))
    assert refused(make_zip(GOOD), "file", limits=few) == "training file has 5 images; the limit is 4"
    bomb = make_zip({**GOOD, "cat/zeros.png": bytes(5 << 20)})  # 5 MiB of zeros: a 5 kB member
    assert len(bomb) < 100_000
    message = refused(bomb, "file", limits=ImageDatasetLimits(max_uncompressed_bytes=1 << 20))
    assert message.startswith("training file unpacks to 5,") and message.endswith("the limit is 1,048,576 bytes")
    tight = ImageDatasetLimits(image=ImageLimits(max_bytes=50))
    assert refused(make_zip(GOOD), "member 'dog/000.png'", limits=tight).endswith(
        "bytes; the limit is 50 bytes per file")
    assert refused(make_zip(GOOD), "file", limits=ImageDatasetLimits(dataset=DatasetLimits(max_bytes=100))) \
        .endswith("bytes; the limit is 100 bytes")


def test_sizes_that_lie_are_refused() -> None:
    # The member's header claims 10 bytes; it inflates to far more. Never trusted: the read
    # stops at the claim and the CRC of what was read does not match.
    data = bytearray(make_zip({"cat/a.png": distinct(1), "dog/b.png": solid((5, 5, 5), (200, 200))}))
    real = len(solid((5, 5, 5), (200, 200)))
    for offset in (i for i in range(len(data) - 4) if data[i:i + 4] == struct.pack("<I", real)):
        data[offset:offset + 4] = struct.pack("<I", 10)
    message = refused(bytes(data), "member 'dog/b.png'")
    assert message.startswith("training file member 'dog/b.png' is corrupt in the zip (")


def test_reads_count_bytes_against_the_total_whatever_the_caller_checked() -> None:
    data = make_zip({"a/1.bin": bytes(60), "a/2.bin": bytes(60)})
    with ZipUpload(data, ZipLimits(max_members=5, max_member_bytes=100, max_total_bytes=100)) as upload:
        assert upload.declared_bytes() == 120 and upload.read(upload.files[0]) == bytes(60)
        with pytest.raises(ZipProblem) as caught:
            upload.read(upload.files[1])
    assert caught.value.member == "a/2.bin" and caught.value.problem == (
        "unpacks to more than 40 bytes (what is left of the limit for the whole zip; its header declares 60)")


def test_unreadable_uploads_are_refused() -> None:
    assert refused(b"", "file") == "training file is empty"
    assert refused(os.urandom(64), "file").startswith("training file is neither a zip of label folders")
    assert refused(b"PK\x03\x04" + os.urandom(64), "file").startswith("training file is not a readable zip file (")
    assert refused(b"{}", "format", format="tar") == "format must be 'zip' or 'jsonl', got 'tar'"


# --- refusals: the images and labels ---------------------------------------------------------


def test_bad_images_in_a_zip_are_refused_by_name() -> None:
    def member(content: bytes) -> str:
        return refused(make_zip({**GOOD, "cat/bad.png": content}), "member 'cat/bad.png'")
    assert member(b"not an image").startswith(
        "training file member 'cat/bad.png' is not an image in an allowed format")
    assert member(distinct(60)[:-40]).startswith("training file member 'cat/bad.png' is truncated or corrupt (")
    assert member(png_header_only(7000, 7000)).endswith("a decompression bomb?); the limit is 40,000,000 pixels")
    assert member(solid((1, 1, 1), (5, 40))).endswith("is 5 x 40 pixels; each side must be at least 8")
    assert member(solid((1, 1, 1), fmt="TIFF")).endswith("is in TIFF format; allowed formats are JPEG, PNG, "
                                                         "WebP, GIF (first frame) and BMP")


def test_the_same_image_under_two_labels_names_both() -> None:
    data = make_zip({**GOOD, "dog/copy.png": GOOD["cat/000.png"]})
    assert refused(data, "member 'dog/copy.png'") == (
        "training file member 'dog/copy.png' repeats the image of member 'cat/000.png' with a "
        "different label ('dog' here, 'cat' there)")
    lines = jsonl([{"image": b64(distinct(1)), "label": "a"}, {"image": b64(distinct(2)), "label": "b"},
                   {"image": b64(distinct(1)), "label": "b"}])
    assert refused(lines, "line 3") == (
        "training file line 3 repeats the image of line 1 with a different label ('b' here, 'a' there)")


def test_label_counts_are_checked() -> None:
    assert refused(make_zip(image_folder({"cat": 3})), "file") == (
        "training file has only one label ('cat'); a classifier needs at least 2")
    assert refused(make_zip(image_folder({"cat": 3, "dog": 1})), "file") == (
        "training file has 1 example of label 'dog'; each label needs at least 2")
    three = ImageDatasetLimits(dataset=DatasetLimits(max_labels=2))
    assert refused(make_zip(image_folder({"a": 2, "b": 2, "c": 2})), "file", limits=three) == (
        "training file has 3 labels; the limit is 2")


@pytest.mark.parametrize(("line", "problem"), [
    ("not json", "not valid JSON: Expecting value (column 1)"),
    ("[1]", 'expected a JSON object like {"image": ..., "label": ...}, got an array'),
    ('{"image": "", "label": "a", "label": "b"}', "field 'label' appears more than once"),
    ('{"image": "AAAA"}', "missing field 'label'; each line needs exactly 'image' and 'label'"),
    ('{"image": "AAAA", "label": "a", "text": "x"}',
     "unexpected field 'text'; each line needs exactly 'image' and 'label'"),
    ('{"image": 5, "label": "a"}', "'image' must be a base64 string, got a number (5)"),
    ('{"image": "not*base64", "label": "a"}', "'image' is not valid base64"),
    ('{"image": "aGVsbG8=", "label": "a"}',
     "'image' is not an image in an allowed format (JPEG, PNG, WebP, GIF (first frame) and BMP)"),
    ('{"image": "aGVsbG8=", "label": " "}', "'label' is empty"),
    ('{"image": "aGVsbG8=", "label": [1]}', "'label' must be a string (or an integer), got an array"),
])
def test_bad_jsonl_lines_are_refused_by_line(line: str, problem: str) -> None:
    good = [{"image": b64(distinct(i)), "label": "ab"[i % 2]} for i in range(4)]
    data = jsonl([good[0], "", line, *good[1:]])
    assert refused(data, "line 3") == f"training file line 3: {problem}"


def test_jsonl_images_over_the_byte_limit_are_refused_before_decoding() -> None:
    limits = ImageDatasetLimits(image=ImageLimits(max_bytes=30))
    assert refused(jsonl([{"image": "A" * 80, "label": "a"}]), "line 1", limits=limits) == (
        "training file line 1: 'image' is 60 bytes; the limit is 30 bytes")
    few = ImageDatasetLimits(dataset=DatasetLimits(max_rows=2))
    rows = [{"image": b64(distinct(i)), "label": "ab"[i % 2]} for i in range(3)]
    assert refused(jsonl(rows), "file", limits=few) == (
        "training file has more than 2 rows (stopped at line 3); the limit is 2")


# --- a real data set -------------------------------------------------------------------------


@pytest.mark.slow
def test_real_fashion_mnist_images_parse() -> None:
    from bench.image_data import available, fashion_mnist
    if not available():
        pytest.skip("Fashion-MNIST IDX files missing: apt-get install dataset-fashion-mnist")
    train, _ = fashion_mnist(20, 0, seed=0)
    members = {f"{label.replace('/', '-')}/{i}.png": encode(image) for i, (image, label) in enumerate(train)}
    ds = parse_image_dataset(make_zip(members))
    assert len(ds.labels) == 10 and set(ds.counts().values()) == {2} and ds.duplicates_dropped == 0
    image = ds.image(0)
    assert image.size == (28, 28) and image.mode == "RGB"
