"""Labelled text-classification datasets, validated completely before anything trains.

Contract:

* Input is an uploaded file (``parse_dataset``: JSON Lines or CSV bytes) or an in-memory list
  of ``{"text": ..., "label": ...}`` records (``from_records``, e.g. a JSON request body).
  Either way the result is a ``Dataset`` or a ``DatasetError`` (code ``invalid_dataset``);
  nothing is half-accepted.
* Checks run in a fixed order and stop at the FIRST problem: size in bytes (before decoding),
  UTF-8 (a leading BOM is stripped; the bad byte's line is named), emptiness, then each row
  in file order, then whole-dataset checks (label count, examples per label).
* Row errors name where they are: ``param="line N"`` and ``.line == N`` for files, where N is
  the 1-based physical line on which the row starts (CSV quoted fields may span lines);
  ``param="row N"`` (1-based, ``.line`` is ``None``) for records. Whole-dataset errors have
  ``param="file"`` (files) or ``param=what`` (records).
* Each row has exactly the fields ``text`` and ``label``. Text is kept exactly as given but
  must be a non-blank string of at most ``max_text_chars`` characters with no NUL or unpaired
  surrogate. A label is a string (an integer is accepted and converted), stripped of
  surrounding whitespace, 1-128 characters, no control characters.
* A row repeating an earlier row's text and label is dropped and counted in
  ``duplicates_dropped``; the same text with a different label is an error naming both rows.
  ``max_rows`` counts rows as given (duplicates included), so a huge file stops early.
* ``stratified_split`` and ``check_validation_set`` prepare the held-out set the quality gate
  scores on. The split is a pure function of the dataset and the seed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from adapters.errors import DatasetError

FIELDS = ("text", "label")
FORMATS = ("jsonl", "csv")
MAX_LABEL_CHARS = 128
BOM = b"\xef\xbb\xbf"
# The csv module refuses fields longer than this process-wide limit; we never raise it
# (it is global state shared with every other csv user in the process).
CSV_FIELD_LIMIT = csv.field_size_limit()

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class DatasetLimits:
    max_rows: int = 50_000
    max_labels: int = 100
    min_examples_per_label: int = 2
    max_text_chars: int = 20_000
    max_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_labels", "min_examples_per_label", "max_text_chars", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DatasetLimits.{name} must be a positive integer, got {value!r}")
        if self.max_labels < 2:
            raise ValueError("DatasetLimits.max_labels must be at least 2 (a classifier needs two labels)")


@dataclass(frozen=True)
class Dataset:
    examples: tuple[Example, ...]
    labels: tuple[str, ...]  # sorted, unique; may name labels with no examples (split halves)
    duplicates_dropped: int = 0
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Cheap structural check so a hand-built Dataset cannot yield label ids out of range.
        if list(self.labels) != sorted(set(self.labels)):
            raise DatasetError("Dataset.labels must be sorted and unique", param="labels")
        index = {label: i for i, label in enumerate(self.labels)}
        for example in self.examples:
            if example.label not in index:
                raise DatasetError(
                    f"example label {_show(example.label)} is not in Dataset.labels", param="labels"
                )
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.examples)

    def texts(self) -> list[str]:
        return [example.text for example in self.examples]

    def label_ids(self) -> list[int]:
        """Each example's label as an index into ``labels``."""
        return [self._index[example.label] for example in self.examples]

    def counts(self) -> dict[str, int]:
        """Examples per label, in ``labels`` order, zeros included."""
        counter = Counter(example.label for example in self.examples)
        return {label: counter[label] for label in self.labels}


# --- public entry points -----------------------------------------------------------------


def parse_dataset(
    data: bytes,
    *,
    format: str | None = None,
    limits: DatasetLimits = DatasetLimits(),
    what: str = "training file",
) -> Dataset:
    """Parse and validate an uploaded JSONL or CSV file; ``format=None`` sniffs it.

    Sniffing: the first non-whitespace character ``{`` means JSON Lines, anything else CSV.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DatasetError(f"{what} must be bytes, got {type(data).__name__}", param="file")
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise DatasetError(
            f"{what} is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes",
            param="file",
        )
    text = _decode(data, what)
    if not text.strip():
        raise DatasetError(f"{what} is empty", param="file")

    if format is None:
        first = text.lstrip()[0]
        if first == "[":
            # A JSON array would otherwise be read as a one-column CSV with a baffling error.
            raise DatasetError(
                f"{what} looks like a JSON array; upload JSON Lines (one "
                '{"text": ..., "label": ...} object per line) or CSV',
                param="file",
            )
        format = "jsonl" if first == "{" else "csv"
    elif not isinstance(format, str) or format.strip().lower() not in FORMATS:
        raise DatasetError(f"format must be 'jsonl' or 'csv', got {format!r}", param="format")
    format = format.strip().lower()

    collector = _Collector(limits, what, unit="line", whole_param="file")
    rows = _jsonl_rows(text, collector) if format == "jsonl" else _csv_rows(text, collector)
    for line_no, text_value, label_value in rows:
        collector.add(text_value, label_value, line_no)
    return collector.finish()


def from_records(
    records: list[Any],
    *,
    limits: DatasetLimits = DatasetLimits(),
    what: str = "training_data",
) -> Dataset:
    """Validate an in-memory list of ``{"text": str, "label": str | int}`` records.

    Row numbers in errors count from 1 (``param="row 1"`` is ``records[0]``).
    """
    if not isinstance(records, (list, tuple)):
        raise DatasetError(
            f'{what} must be a list of {{"text": ..., "label": ...}} objects, got {_kind(records)}',
            param=what,
        )
    if not records:
        raise DatasetError(f"{what} is empty", param=what)
    if len(records) > limits.max_rows:
        raise DatasetError(
            f"{what} has {len(records):,} rows; the limit is {limits.max_rows:,}", param=what
        )
    collector = _Collector(limits, what, unit="row", whole_param=what)
    for row_no, record in enumerate(records, start=1):
        if not isinstance(record, Mapping):
            collector.fail(
                row_no, f'expected an object with "text" and "label", got {_kind(record)}'
            )
        _check_keys(collector, row_no, list(record.keys()), "each row")
        collector.add(record["text"], record["label"], row_no)
    return collector.finish()


def label_problem(label: str) -> str | None:
    """What is wrong with one label name (already stripped), or None: the rule uploads, jobs and
    adapter imports share. Reads after "'label' ", e.g. "is empty"."""
    if not label:
        return "is empty"
    if len(label) > MAX_LABEL_CHARS:
        return f"is {len(label):,} characters; the limit is {MAX_LABEL_CHARS}"
    if _CONTROL.search(label) or _SURROGATE.search(label):
        # Labels come back in responses, metrics and logs: keep them printable.
        return f"{_show(label)} contains a control character"
    return None


def label_count_problem(labels: tuple[str, ...] | list[str], limits: DatasetLimits) -> str | None:
    """What is wrong with a classifier's set of (distinct) labels under ``limits``, or None.
    Reads after the thing's name, e.g. "has 4 labels; the limit is 3"."""
    if not labels:
        return "has no labels; a classifier needs at least 2"
    if len(labels) < 2:
        return f"has only one label ({_show(labels[0])}); a classifier needs at least 2"
    if len(labels) > limits.max_labels:
        return f"has {len(labels):,} labels; the limit is {limits.max_labels:,}"
    return None


def stratified_split(
    ds: Dataset, *, fraction: float = 0.1, seed: int = 0, min_per_label: int = 1
) -> tuple[Dataset, Dataset]:
    """Split into ``(train, validation)``, label by label, deterministically for a seed.

    A label with n examples puts ``min(n - 1, max(min_per_label, round(fraction * n)))`` of
    them in validation (0 when n == 1), so every label keeps at least one training example
    and every label with two or more has at least one validation example. Rounding is half
    up. Each label is shuffled by its own RNG seeded from ``(seed, label)``, so adding or
    removing another label leaves its split unchanged. Both halves keep the original example
    order and ``ds.labels``; ``duplicates_dropped`` stays with train.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DatasetError(
            f"fraction must be between 0 and 1 (exclusive), got {fraction!r}", param="fraction"
        )
    if isinstance(min_per_label, bool) or not isinstance(min_per_label, int) or min_per_label < 1:
        raise DatasetError(
            f"min_per_label must be a positive integer, got {min_per_label!r}", param="min_per_label"
        )

    by_label: dict[str, list[int]] = {label: [] for label in ds.labels}
    for i, example in enumerate(ds.examples):
        by_label[example.label].append(i)

    held_out: set[int] = set()
    for label, indices in by_label.items():
        n = len(indices)
        if n < 2:
            continue
        take = min(n - 1, max(min_per_label, math.floor(fraction * n + 0.5)))
        # String seeds hash with sha512, so this is stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"{seed}\x00{label}")
        shuffled = indices[:]
        rng.shuffle(shuffled)
        held_out.update(shuffled[:take])
    if not held_out:
        raise DatasetError(
            "cannot split off a validation set: no label has 2 or more examples", param="validation"
        )
    train = tuple(e for i, e in enumerate(ds.examples) if i not in held_out)
    validation = tuple(e for i, e in enumerate(ds.examples) if i in held_out)
    return (
        Dataset(train, ds.labels, ds.duplicates_dropped),
        Dataset(validation, ds.labels, 0),
    )


def check_validation_set(train: Dataset, validation: Dataset, *, what: str = "validation set") -> int:
    """Check a separately supplied validation set against its training set.

    The validation set must be non-empty and use only labels that have training examples
    (the model cannot predict a label it never saw). Texts that also appear in training are
    allowed; their number is returned so callers can warn about an optimistic score.
    """
    if len(validation) == 0:
        raise DatasetError(f"{what} is empty", param="validation")
    trained = {example.label for example in train.examples}
    unknown = Counter(e.label for e in validation.examples if e.label not in trained)
    if unknown:
        label, count = sorted(unknown.items())[0]
        more = len(unknown) - 1
        others = f" and {more} more unknown label{_s(more)}" if more else ""
        raise DatasetError(
            f"{what} uses label {_show(label)} ({count} example{_s(count)}){others}, "
            "which the training data does not have",
            param="validation",
        )
    train_texts = {example.text for example in train.examples}
    return sum(1 for example in validation.examples if example.text in train_texts)


# --- internals ---------------------------------------------------------------------------


class _Collector:
    """Per-row field checks, duplicate handling, limits; then the whole-dataset checks."""

    def __init__(self, limits: DatasetLimits, what: str, *, unit: str, whole_param: str) -> None:
        self.limits = limits
        self.what = what
        self.unit = unit  # "line" (files) or "row" (records)
        self.whole_param = whole_param
        self.examples: list[Example] = []
        self.first_seen: dict[Any, tuple[str, Any]] = {}  # text (or image digest) -> (label, where)
        self.rows = 0
        self.duplicates = 0

    def fail(self, where: int, problem: str, *, sep: str = ": ") -> NoReturn:
        raise DatasetError(
            f"{self.what} {self.unit} {where}{sep}{problem}",
            param=f"{self.unit} {where}",
            line=where if self.unit == "line" else None,
        )

    def fail_whole(self, problem: str, *, line: int | None = None) -> NoReturn:
        raise DatasetError(f"{self.what} {problem}", param=self.whole_param, line=line)

    def count_row(self, where: int) -> None:
        self.rows += 1
        if self.rows > self.limits.max_rows:
            self.fail_whole(
                f"has more than {self.limits.max_rows:,} rows (stopped at {self.unit} {where}); "
                f"the limit is {self.limits.max_rows:,}",
                line=where if self.unit == "line" else None,
            )

    def add(self, text: Any, label: Any, where: int) -> None:
        if self.unit == "row":  # files count rows as they read them (before field checks)
            self.count_row(where)
        if not isinstance(text, str):
            self.fail(where, f"'text' must be a string, got {_kind(text)}")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str):
            self.fail(where, f"'label' must be a string (or an integer), got {_kind(label)}")

        if not text:
            self.fail(where, "'text' is empty")
        if not text.strip():
            self.fail(where, "'text' is only whitespace")
        if len(text) > self.limits.max_text_chars:
            self.fail(
                where,
                f"'text' is {len(text):,} characters; the limit is {self.limits.max_text_chars:,}",
            )
        if "\x00" in text:
            self.fail(where, f"'text' contains a NUL character (at character {text.index(chr(0)) + 1})")
        if _SURROGATE.search(text):
            self.fail(where, "'text' contains an unpaired UTF-16 surrogate")

        label = label.strip()
        problem = label_problem(label)
        if problem:
            self.fail(where, f"'label' {problem}")

        if self.first_time(text, label, where, "text"):
            self.examples.append(Example(text, label))

    def first_time(self, key: Any, label: str, where: Any, what: str) -> bool:
        """True the first time ``key`` (a text, an image's pixel digest) is seen; False for an exact
        repeat (same label: counted in ``duplicates``, dropped); a repeat with another label fails,
        naming both rows."""
        seen = self.first_seen.get(key)
        if seen is None:
            self.first_seen[key] = (label, where)
            return True
        seen_label, seen_where = seen
        if seen_label == label:
            self.duplicates += 1
            return False
        self.fail(
            where,
            f"repeats the {what} of {self.unit} {seen_where} with a different label "
            f"({_show(label)} here, {_show(seen_label)} there)",
            sep=" ",  # reads as a sentence: "line 9 repeats the text of line 2 ..."
        )

    def finish(self) -> Dataset:
        if not self.examples:
            self.fail_whole("has no examples")
        counts = Counter(example.label for example in self.examples)
        labels = tuple(sorted(counts))
        problem = label_count_problem(labels, self.limits)
        if problem:
            self.fail_whole(problem)
        need = self.limits.min_examples_per_label
        short = sorted((count, label) for label, count in counts.items() if count < need)
        if short:
            count, label = short[0]
            others = ""
            if len(short) > 1:
                named = ", ".join(_show(lbl) for _, lbl in short[1:6])
                more = ", ..." if len(short) > 6 else ""
                others = f" ({len(short) - 1} more labels fall short: {named}{more})"
            self.fail_whole(
                f"has {count} example{_s(count)} of label {_show(label)}; each label needs "
                f"at least {need}{others}"
            )
        return Dataset(tuple(self.examples), labels, self.duplicates)


def _decode(data: bytes, what: str) -> str:
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        hint = "save it as UTF-8"
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            hint = "it looks like UTF-16; save it as UTF-8"
        raise DatasetError(
            f"{what} line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at byte "
            f"{column} of the line); {hint}",
            param=f"line {line}",
            line=line,
        ) from None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _pairs_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # json.loads would silently keep the last one; a repeated "label" is ambiguous.
            raise _DuplicateKey(key)
        result[key] = value
    return result


class RowSink(Protocol):
    """Where a parser reports rows: counts them (limits) and fails on a bad one (raises)."""

    def count_row(self, where: int) -> None: ...

    def fail(self, where: int, problem: str) -> NoReturn: ...


def json_lines(text: str, sink: RowSink) -> Iterator[tuple[int, Any]]:
    """Each non-blank line's JSON value with its 1-based line number (every task's JSONL parser).

    A line that is not JSON, or repeats a key in an object, fails through ``sink`` naming the
    line. Splits on "\n" only: str.splitlines would also split on U+2028 etc., which JSON
    strings may contain raw, and would disagree with the line numbers of the UTF-8 check.
    """
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        sink.count_row(line_no)
        try:
            value = json.loads(line, object_pairs_hook=_pairs_without_repeats)
        except _DuplicateKey as error:
            sink.fail(line_no, f"field {_show(error.key)} appears more than once")
        except json.JSONDecodeError as error:
            sink.fail(line_no, f"not valid JSON: {error.msg} (column {error.colno})")
        except RecursionError:
            sink.fail(line_no, "not valid JSON: nested too deeply")
        except ValueError as error:  # e.g. an integer too long to convert
            sink.fail(line_no, f"not valid JSON: {error}")
        yield line_no, value


def _jsonl_rows(text: str, collector: _Collector) -> Iterator[tuple[int, Any, Any]]:
    for line_no, value in json_lines(text, collector):
        if not isinstance(value, dict):
            collector.fail(
                line_no, f'expected a JSON object like {{"text": ..., "label": ...}}, got {_kind(value)}'
            )
        _check_keys(collector, line_no, list(value.keys()), "each line")
        yield line_no, value["text"], value["label"]


def _check_keys(collector: _Collector, where: int, keys: list[Any], each: str) -> None:
    extra = [key for key in keys if key not in FIELDS]
    if extra:
        names = ", ".join(_show(key) for key in extra[:5]) + (", ..." if len(extra) > 5 else "")
        collector.fail(
            where,
            f"unexpected field{_s(len(extra))} {names}; {each} needs exactly 'text' and 'label'",
        )
    missing = [name for name in FIELDS if name not in keys]
    if missing:
        collector.fail(where, f"missing field{_s(len(missing))} " + " and ".join(map(repr, missing)))


def _csv_rows(text: str, collector: _Collector) -> Iterator[tuple[int, Any, Any]]:
    # newline="\n": lines end at "\n" only, matching the line numbers of the UTF-8 check;
    # "\r\n" still parses because the csv reader strips the "\r".
    reader = csv.reader(io.StringIO(text, newline="\n"), strict=True)
    columns: dict[str, int] | None = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            collector.fail(start, _csv_problem(str(error), start, reader.line_num))
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if columns is None:
            columns = _csv_header(row, start, collector)
            continue
        collector.count_row(start)
        if len(row) != len(columns):
            collector.fail(
                start,
                f"expected 2 fields (text and label), found {len(row)}; "
                "put text containing commas, quotes or line breaks in double quotes",
            )
        yield start, row[columns["text"]], row[columns["label"]]


def _csv_header(row: list[str], line_no: int, collector: _Collector) -> dict[str, int]:
    hint = "the first line must be a header naming the columns text and label"
    names = [cell.strip().lower() for cell in row]
    columns: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in columns:
            collector.fail(line_no, f"column {_show(name)} appears twice in the header")
        columns[name] = i
    extra = [row[i].strip() for i, name in enumerate(names) if name not in FIELDS]
    missing = [name for name in FIELDS if name not in columns]
    if missing:
        problem = f"header is missing column{_s(len(missing))} " + " and ".join(map(repr, missing))
        if extra:
            problem += " (found " + ", ".join(_show(name) for name in extra[:5]) + ")"
        collector.fail(line_no, f"{problem}; {hint}")
    if extra:
        shown = ", ".join(_show(name) if name else "an unnamed column" for name in extra[:5])
        collector.fail(
            line_no, f"unexpected column{_s(len(extra))} {shown}; the header must be exactly text,label"
        )
    return columns


def _csv_problem(message: str, start: int, end: int) -> str:
    if "field larger than field limit" in message:
        return f"malformed CSV: a field is longer than {CSV_FIELD_LIMIT:,} characters"
    if "unexpected end of data" in message or "EOF" in message:
        return "malformed CSV: a quoted field starting in this row is never closed"
    if "new-line character seen in unquoted field" in message:
        message = "carriage return (\\r) inside an unquoted field"
    near = f" (near line {end})" if end != start else ""
    return f"malformed CSV{near}: {message}"


def _kind(value: Any) -> str:
    """Name a value's type the way a JSON user would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})" if len(repr(value)) <= 40 else "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _show(value: Any, limit: int = 40) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _s(n: int) -> str:
    return "" if n == 1 else "s"
