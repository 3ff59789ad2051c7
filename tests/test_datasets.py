"""Datasets: every malformed upload is refused with its line named; good ones parse exactly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.datasets import (
    Dataset,
    DatasetLimits,
    Example,
    check_validation_set,
    from_records,
    parse_dataset,
    stratified_split,
)
from adapters.errors import DatasetError, TailorError

GOOD = [
    {"text": "great film", "label": "pos"},
    {"text": "awful plot", "label": "neg"},
    {"text": "loved it", "label": "pos"},
    {"text": "boring", "label": "neg"},
]


def jsonl(*rows: Any) -> bytes:
    """One line per row; dicts/lists are JSON-encoded, strings are taken as the raw line."""
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


def fails(data: bytes, **kwargs: Any) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        parse_dataset(data, **kwargs)
    error = info.value
    assert error.code == "invalid_dataset"
    assert isinstance(error, TailorError) and isinstance(error, ValueError)
    assert error.message == str(error)
    return error


def fails_records(records: Any, **kwargs: Any) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        from_records(records, **kwargs)
    return info.value


def at_line(error: DatasetError, line: int) -> None:
    assert error.param == f"line {line}"
    assert error.line == line
    assert f"line {line}:" in error.message or f"line {line} repeats" in error.message


# --- happy paths -------------------------------------------------------------------------


def test_jsonl_round_trip() -> None:
    ds = parse_dataset(jsonl(*GOOD))
    assert len(ds) == 4
    assert ds.labels == ("neg", "pos")
    assert ds.examples[0] == Example("great film", "pos")
    assert ds.texts() == ["great film", "awful plot", "loved it", "boring"]
    assert ds.label_ids() == [1, 0, 1, 0]
    assert ds.counts() == {"neg": 2, "pos": 2}
    assert ds.duplicates_dropped == 0


def test_jsonl_blank_lines_crlf_and_int_labels() -> None:
    data = (
        b'\n  \r\n{"text": "a", "label": 1}\r\n\r\n{"label": 2, "text": "b"}\r\n'
        b'{"text": "c", "label": " 1 "}\n{"text": "d", "label": "2"}'
    )
    ds = parse_dataset(data, format="jsonl")
    assert ds.labels == ("1", "2")
    assert ds.label_ids() == [0, 1, 0, 1]


def test_text_kept_as_given_labels_stripped() -> None:
    ds = parse_dataset(jsonl({"text": "  padded \t", "label": "  pos\t"}, {"text": "x", "label": "neg"},
                             {"text": "y", "label": "pos"}, {"text": "z", "label": "neg"}))
    assert ds.examples[0] == Example("  padded \t", "pos")


def test_jsonl_unicode_and_line_separator_inside_string() -> None:
    # U+2028 is legal raw inside a JSON string and must not be taken as a line break.
    rows = [{"text": "caf\u00e9 \u2028 \U0001f600", "label": "\u00e9t\u00e9"}, {"text": "b", "label": "x"},
            {"text": "c", "label": "\u00e9t\u00e9"}, {"text": "d", "label": "x"}]
    data = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    ds = parse_dataset(data)
    assert ds.examples[0].text == "caf\u00e9 \u2028 \U0001f600"
    assert ds.labels == ("x", "\u00e9t\u00e9")


def test_csv_quoted_commas_embedded_newlines_any_column_order() -> None:
    data = (
        b' Label , TEXT \r\n'
        b'pos,"great, really great"\r\n'
        b'neg,"line one\nline two"\r\n'
        b'\r\n'
        b'pos,"she said ""wow"""\r\n'
        b'neg,plain\r\n'
    )
    ds = parse_dataset(data)
    assert ds.texts() == ["great, really great", "line one\nline two", 'she said "wow"', "plain"]
    assert [e.label for e in ds.examples] == ["pos", "neg", "pos", "neg"]


def test_bom_is_stripped_for_both_formats() -> None:
    ds = parse_dataset(b"\xef\xbb\xbftext,label\na,x\nb,y\nc,x\nd,y\n")
    assert ds.labels == ("x", "y")
    ds = parse_dataset(b"\xef\xbb\xbf" + jsonl(*GOOD))
    assert len(ds) == 4


def test_sniffing() -> None:
    assert len(parse_dataset(b"\n\n   " + jsonl(*GOOD))) == 4  # first non-blank char "{"
    assert len(parse_dataset(b"text,label\na,x\nb,y\nc,x\nd,y\n")) == 4
    # Forced format wins over the sniff: JSONL read as CSV has no valid header.
    error = fails(jsonl(*GOOD), format="csv")
    at_line(error, 1)
    assert "header is missing" in error.message
    assert len(parse_dataset(jsonl(*GOOD), format=" JSONL ")) == 4


def test_json_array_is_refused_with_a_hint() -> None:
    error = fails(json.dumps(GOOD).encode())
    assert error.param == "file" and "JSON array" in error.message and "JSON Lines" in error.message


def test_unknown_format() -> None:
    error = fails(jsonl(*GOOD), format="xlsx")
    assert error.param == "format" and "'jsonl' or 'csv'" in error.message


def test_exact_duplicates_dropped_and_counted() -> None:
    ds = parse_dataset(jsonl(*GOOD, GOOD[0], GOOD[1], GOOD[0], {"text": "great film", "label": " pos "}))
    assert len(ds) == 4
    assert ds.duplicates_dropped == 4
    assert ds.texts() == ["great film", "awful plot", "loved it", "boring"]
    # Text is compared exactly: a trailing space makes a different example.
    ds = parse_dataset(jsonl(*GOOD, {"text": "great film ", "label": "pos"}))
    assert len(ds) == 5 and ds.duplicates_dropped == 0


def test_same_text_different_label_names_both_lines() -> None:
    error = fails(jsonl(GOOD[0], "", *GOOD[1:], {"text": "great film", "label": "neg"}))
    at_line(error, 6)
    assert error.message.startswith("training file line 6 repeats the text of line 1 with a different label")
    assert "'neg'" in error.message and "'pos'" in error.message


def test_csv_conflict_uses_row_start_lines() -> None:
    data = b'text,label\n"multi\nline",a\nx,b\ny,a\n"multi\nline",b\n'
    error = fails(data)
    at_line(error, 6)
    assert "repeats the text of line 2" in error.message


def test_in_memory_records() -> None:
    ds = from_records(GOOD + [GOOD[0]])
    assert ds.labels == ("neg", "pos") and len(ds) == 4 and ds.duplicates_dropped == 1
    ds = from_records(tuple({"text": f"t{i}", "label": i % 2} for i in range(6)))
    assert ds.labels == ("0", "1")


def test_records_errors_name_rows() -> None:
    error = fails_records(GOOD[:2] + [{"text": "x", "label": None}])
    assert error.param == "row 3" and error.line is None
    assert error.message == "training_data row 3: 'label' must be a string (or an integer), got null"
    error = fails_records(GOOD + ["just text"])
    assert error.param == "row 5" and "got a string" in error.message
    error = fails_records([*GOOD, {"text": "x", "label": "pos", "weight": 2}])
    assert error.param == "row 5" and "unexpected field 'weight'" in error.message
    error = fails_records([*GOOD, {"text": "great film", "label": "neg"}], what="examples")
    assert error.param == "row 5"
    assert error.message.startswith("examples row 5 repeats the text of row 1 with a different label")
    error = fails_records({"text": "a", "label": "b"})
    assert error.param == "training_data" and "must be a list" in error.message
    error = fails_records([])
    assert error.param == "training_data" and "is empty" in error.message
    error = fails_records(GOOD[:1] + [{"text": "x", "label": "pos"}])
    assert error.param == "training_data" and "only one label" in error.message


# --- whole-file errors -------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\n\n", b"  \r\n\t\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf \n"])
def test_empty_files(data: bytes) -> None:
    error = fails(data)
    assert error.param == "file" and error.line is None
    assert error.message == "training file is empty"


def test_csv_header_only_has_no_examples() -> None:
    error = fails(b"text,label\n\n", what="validation file")
    assert error.param == "file" and error.message == "validation file has no examples"


def test_byte_limit_checked_before_decoding() -> None:
    data = b"\xff" * 101  # not UTF-8 either: the size error must come first
    error = fails(data, limits=DatasetLimits(max_bytes=100))
    assert error.param == "file"
    assert "101 bytes; the limit is 100 bytes" in error.message
    assert len(parse_dataset(jsonl(*GOOD), limits=DatasetLimits(max_bytes=len(jsonl(*GOOD))))) == 4


def test_bad_utf8_names_the_line() -> None:
    data = jsonl(*GOOD[:2]) + b'{"text": "caf\xe9", "label": "pos"}\n' + jsonl(*GOOD[2:])
    error = fails(data)
    at_line(error, 3)
    assert "not valid UTF-8" in error.message and "0xe9" in error.message
    error = fails(b"text,label\r\nok,x\r\n\r\nbad \xc3(,y\r\n")
    at_line(error, 4)


def test_utf16_gets_a_hint() -> None:
    error = fails("text,label\na,x\n".encode("utf-16"))
    at_line(error, 1)
    assert "UTF-16" in error.message


def test_too_few_labels() -> None:
    error = fails(jsonl({"text": "a", "label": "x"}, {"text": "b", "label": "x"}))
    assert error.param == "file"
    assert "only one label ('x')" in error.message and "at least 2" in error.message


def test_too_many_labels() -> None:
    rows = [{"text": f"t{i}-{j}", "label": f"L{i}"} for i in range(4) for j in range(2)]
    error = fails(jsonl(*rows), limits=DatasetLimits(max_labels=3))
    assert error.param == "file" and "has 4 labels; the limit is 3" in error.message
    assert len(parse_dataset(jsonl(*rows), limits=DatasetLimits(max_labels=4)).labels) == 4


def test_too_many_rows_stops_early() -> None:
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)]
    # Line 7 is garbage: the row limit must trip at line 6 before it is ever parsed.
    data = jsonl(*rows[:5], "", rows[5], "not json", *rows[6:])
    error = fails(data, limits=DatasetLimits(max_rows=5))
    assert error.param == "file" and error.line == 7
    assert "more than 5 rows" in error.message and "the limit is 5" in error.message
    csv_data = b"text,label\n" + b"".join(f"t{i},{'ab'[i % 2]}\n".encode() for i in range(10))
    error = fails(csv_data, limits=DatasetLimits(max_rows=9))
    assert error.line == 11 and "more than 9 rows" in error.message
    assert len(parse_dataset(csv_data, limits=DatasetLimits(max_rows=10))) == 10
    error = fails_records(rows, limits=DatasetLimits(max_rows=9))
    assert error.param == "training_data" and "10 rows; the limit is 9" in error.message


def test_min_examples_per_label_names_label_and_count() -> None:
    rows = [*GOOD, {"text": "meh", "label": "neutral"}]
    error = fails(jsonl(*rows))
    assert error.param == "file"
    assert "has 1 example of label 'neutral'; each label needs at least 2" in error.message
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)]
    rows += [{"text": "c1", "label": "c"}, {"text": "c2", "label": "c"}, {"text": "d1", "label": "d"}]
    error = fails(jsonl(*rows), limits=DatasetLimits(min_examples_per_label=3))
    assert "has 1 example of label 'd'; each label needs at least 3" in error.message
    assert "1 more labels fall short: 'c'" in error.message
    # Duplicates do not count towards the minimum.
    error = fails(jsonl(*GOOD, {"text": "meh", "label": "neutral"}, {"text": "meh", "label": "neutral"}))
    assert "label 'neutral'" in error.message


# --- JSONL row errors --------------------------------------------------------------------


def bad_jsonl_row(row: Any) -> DatasetError:
    """The bad row goes on line 4 (after two good rows and a blank line)."""
    error = fails(jsonl(GOOD[0], GOOD[1], "", row, GOOD[2], GOOD[3]))
    at_line(error, 4)
    return error


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ('{"text": "a", "label": "b"', "not valid JSON: Expecting ',' delimiter"),
        ("text=a label=b", "not valid JSON: Expecting value (column 1)"),
        ('{"text": "a", "label": NaNx}', "not valid JSON"),
        ("[1, 2]", 'expected a JSON object like {"text": ..., "label": ...}, got an array'),
        ('"just a string"', "got a string"),
        ("42", "got a number (42)"),
        ({"text": "a"}, "missing field 'label'"),
        ({"label": "a"}, "missing field 'text'"),
        ({}, "missing fields 'text' and 'label'"),
        (
            {"text": "a", "lable": "pos"},
            "unexpected field 'lable'; each line needs exactly 'text' and 'label'",
        ),
        ({"text": "a", "label": "p", "x": 1, "y": 2}, "unexpected fields 'x', 'y'"),
        ('{"text": "a", "label": "p", "label": "q"}', "field 'label' appears more than once"),
        ({"text": 5, "label": "pos"}, "'text' must be a string, got a number (5)"),
        ({"text": None, "label": "pos"}, "'text' must be a string, got null"),
        ({"text": ["a"], "label": "pos"}, "'text' must be a string, got an array"),
        ({"text": "a", "label": 1.5}, "'label' must be a string (or an integer), got a number (1.5)"),
        ({"text": "a", "label": True}, "'label' must be a string (or an integer), got a boolean (true)"),
        ({"text": "a", "label": None}, "'label' must be a string (or an integer), got null"),
        ({"text": "a", "label": ["pos"]}, "got an array"),
        ({"text": "a", "label": {"name": "pos"}}, "got an object"),
        ({"text": "", "label": "pos"}, "'text' is empty"),
        ({"text": " \t\n ", "label": "pos"}, "'text' is only whitespace"),
        ({"text": "a\u0000b", "label": "pos"}, "'text' contains a NUL character (at character 2)"),
        ('{"text": "a\\ud800", "label": "pos"}', "unpaired UTF-16 surrogate"),
        ({"text": "a", "label": ""}, "'label' is empty"),
        ({"text": "a", "label": "   "}, "'label' is empty"),
        ({"text": "a", "label": "x" * 129}, "'label' is 129 characters; the limit is 128"),
        ({"text": "a", "label": "p\nos"}, "contains a control character"),
    ],
)
def test_jsonl_row_errors(row: Any, expected: str) -> None:
    error = bad_jsonl_row(row)
    assert expected in error.message
    assert error.message.startswith("training file line 4: ")


def test_label_length_boundary_and_long_int_label() -> None:
    rows = [{"text": "a", "label": "x" * 128}, {"text": "b", "label": "y"},
            {"text": "c", "label": "x" * 128}, {"text": "d", "label": "y"}]
    assert parse_dataset(jsonl(*rows)).labels[0] == "x" * 128
    error = bad_jsonl_row('{"text": "a", "label": ' + "9" * 200 + "}")
    assert "'label' is 200 characters" in error.message


def test_text_length_limit() -> None:
    limits = DatasetLimits(max_text_chars=10)
    ok = jsonl({"text": "x" * 10, "label": "a"}, {"text": "y", "label": "b"},
               {"text": "z", "label": "a"}, {"text": "w", "label": "b"})
    assert len(parse_dataset(ok, limits=limits)) == 4
    error = fails(jsonl(GOOD[0], {"text": "\u00e9" * 11, "label": "pos"}), limits=limits)
    at_line(error, 2)
    assert "'text' is 11 characters; the limit is 10" in error.message
    error = fails(b"text,label\r\na,b\r\n" + b"x" * 20_001 + b",c\r\n")
    at_line(error, 3)
    assert "'text' is 20,001 characters; the limit is 20,000" in error.message


def test_first_bad_row_wins() -> None:
    error = fails(jsonl(*GOOD, {"text": 1, "label": "a"}, "not json"))
    at_line(error, 5)
    # Within a row: type errors before content errors.
    error = fails(jsonl(GOOD[0], {"text": "", "label": 1.5}))
    assert "'label' must be a string" in error.message


# --- CSV errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"text", "header is missing column 'label'"),
        (b"label,txt", "header is missing column 'text' (found 'txt')"),
        (b"great film,pos", "header is missing columns 'text' and 'label'"),
        (b"text,label,score", "unexpected column 'score'; the header must be exactly text,label"),
        (b"text,label,", "unexpected column an unnamed column"),
        (b"text,label,a,b", "unexpected columns 'a', 'b'"),
        (b"text,TEXT", "column 'text' appears twice in the header"),
    ],
)
def test_csv_header_errors(header: bytes, expected: str) -> None:
    error = fails(b"\n" + header + b"\na,x\nb,y\n")
    at_line(error, 2)
    assert expected in error.message


def test_csv_missing_header_hint() -> None:
    error = fails(b"great film,pos\nawful,neg\n")
    assert "the first line must be a header naming the columns text and label" in error.message


@pytest.mark.parametrize(
    ("rows", "line", "expected"),
    [
        (b"a,x\nb,y,z\n", 3, "expected 2 fields (text and label), found 3"),
        (b'"multi\nline",x\nb\n', 4, "expected 2 fields (text and label), found 1"),
        (b'a,x\n"bad"quote,y\n', 3, "malformed CSV"),
        (b'a,x\n"never closed,y\nmore\n', 3, "a quoted field starting in this row is never closed"),
        (b"a,x\nb\rc,y\n", 3, "carriage return"),
        (b"a,x\n,y\n", 3, "'text' is empty"),
        (b"a,x\n   ,y\n", 3, "'text' is only whitespace"),
        (b"a,x\nb, \n", 3, "'label' is empty"),
        (b"a,x\nb\x00c,y\n", 3, "NUL character"),
    ],
)
def test_csv_row_errors(rows: bytes, line: int, expected: str) -> None:
    error = fails(b"text,label\n" + rows + b"c,x\nd,y\n")
    at_line(error, line)
    assert expected in error.message


def test_csv_error_names_the_row_start_line() -> None:
    data = b'text,label\n"one\ntwo\nthree",x\n"four\nfive",y,extra\n'
    error = fails(data)
    at_line(error, 5)


# --- Dataset, split, validation set ------------------------------------------------------


def labelled(counts: dict[str, int]) -> Dataset:
    return from_records(
        [{"text": f"{label} example {i}", "label": label} for label, n in counts.items() for i in range(n)],
        limits=DatasetLimits(min_examples_per_label=1),
    )


def test_labels_sorted_and_ids_follow_them() -> None:
    ds = from_records([{"text": f"t{i}", "label": lbl} for i, lbl in enumerate("cabcab")])
    assert ds.labels == ("a", "b", "c")
    assert ds.label_ids() == [2, 0, 1, 2, 0, 1]
    assert ds.counts() == {"a": 2, "b": 2, "c": 2}


def test_dataset_rejects_inconsistent_labels() -> None:
    with pytest.raises(DatasetError):
        Dataset((Example("a", "x"),), ("y",))
    with pytest.raises(DatasetError):
        Dataset((), ("b", "a"))


def test_split_is_deterministic_and_seeded() -> None:
    ds = labelled({"pos": 100, "neg": 100})
    train, val = stratified_split(ds, fraction=0.1, seed=7)
    again_train, again_val = stratified_split(ds, fraction=0.1, seed=7)
    assert (train, val) == (again_train, again_val)
    _, other_val = stratified_split(ds, fraction=0.1, seed=8)
    assert set(other_val.texts()) != set(val.texts())
    assert len(val) == 20 and val.counts() == {"neg": 10, "pos": 10}
    assert len(train) == 180
    assert set(train.texts()).isdisjoint(val.texts())
    assert sorted(train.texts() + val.texts()) == sorted(ds.texts())
    assert train.labels == val.labels == ds.labels
    # Original order is kept within each half.
    order = {t: i for i, t in enumerate(ds.texts())}
    assert [order[t] for t in val.texts()] == sorted(order[t] for t in val.texts())


def test_split_of_one_label_ignores_other_labels() -> None:
    _, val_a = stratified_split(labelled({"a": 50, "b": 50}), seed=3)
    _, val_b = stratified_split(labelled({"a": 50, "c": 7}), seed=3)
    def of_a(ds: Dataset) -> list[str]:
        return [t for t in ds.texts() if t.startswith("a ")]

    assert of_a(val_a) == of_a(val_b)


def test_split_per_label_guarantees() -> None:
    ds = labelled({"big": 1000, "mid": 15, "two": 2, "one": 1})
    train, val = stratified_split(ds, fraction=0.1)
    assert val.counts() == {"big": 100, "mid": 2, "one": 0, "two": 1}  # 1.5 rounds half up
    assert train.counts() == {"big": 900, "mid": 13, "one": 1, "two": 1}
    train, val = stratified_split(ds, fraction=0.5, min_per_label=5)
    assert val.counts() == {"big": 500, "mid": 8, "one": 0, "two": 1}  # capped at n - 1
    assert all(n >= 1 for n in train.counts().values())


def test_split_keeps_duplicates_count_on_train() -> None:
    ds = from_records(GOOD * 2)
    train, val = stratified_split(ds, fraction=0.4)
    assert train.duplicates_dropped == 4 and val.duplicates_dropped == 0


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"fraction": 0}, "fraction"), ({"fraction": 1.0}, "fraction"), ({"fraction": True}, "fraction"),
    ({"min_per_label": 0}, "min_per_label"),
])
def test_split_argument_errors(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(DatasetError) as info:
        stratified_split(labelled({"a": 5, "b": 5}), **kwargs)
    assert info.value.param == param


def test_split_needs_a_label_with_two_examples() -> None:
    with pytest.raises(DatasetError, match="no label has 2 or more"):
        stratified_split(labelled({"a": 1, "b": 1}))


def test_check_validation_set() -> None:
    train = labelled({"pos": 3, "neg": 3})
    val = from_records([{"text": "pos example 0", "label": "pos"}, {"text": "new", "label": "neg"}],
                       limits=DatasetLimits(min_examples_per_label=1))
    assert check_validation_set(train, val) == 1  # overlap is counted, not refused
    unknown = from_records([{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"},
                            {"text": "z", "label": "zzz"}, {"text": "w", "label": "meh"}],
                           limits=DatasetLimits(min_examples_per_label=1))
    with pytest.raises(DatasetError) as info:
        check_validation_set(train, unknown, what="validation file")
    assert info.value.param == "validation"
    assert "validation file uses label 'meh' (2 examples) and 1 more unknown label," in info.value.message
    assert "training data does not have" in info.value.message
    with pytest.raises(DatasetError, match="is empty"):
        check_validation_set(train, Dataset((), train.labels))
    # A label named in train.labels but with no training examples is still unknown.
    no_c = Dataset((Example("x", "a"), Example("y", "b")), ("a", "b", "c"))
    with pytest.raises(DatasetError, match="label 'c'"):
        check_validation_set(no_c, Dataset((Example("z", "c"),), ("a", "b", "c")))


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError):
        DatasetLimits(max_rows=0)
    with pytest.raises(ValueError):
        DatasetLimits(max_labels=1)


def test_csv_field_over_the_csv_module_limit() -> None:
    error = fails(b"text,label\na,x\n" + b"y" * 200_000 + b",z\n")
    at_line(error, 3)
    assert "a field is longer than 131,072 characters" in error.message
