"""Text-generation datasets (adapters.generation.datasets): validation naming the row, the loss
mask exactly, the stored form, the split, and upload through the job system's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.datasets import DatasetLimits
from adapters.errors import DatasetError
from adapters.generation.base import tokenizer_cache
from adapters.generation.datasets import (
    CHAT, COMPLETION, GenerationDataset, GenerationDatasetLimits, check_validation, dump, encode, encode_prompt,
    from_records, limits_for_base, load, parse_dataset, split,
)
from adapters.jobs import task_data
from adapters.jobs.files import Files
from adapters.quotas import TenantQuotas
from adapters.registry import Registry
from adapters.store import LocalStore
from adapters.tasks import TEXT_GENERATION, get_task


@pytest.fixture(scope="module")
def tok() -> Any:
    """SmolLM2's tokenizer (the tiny base's), from the offline cache: no model is built."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_cache()), local_files_only=True)


def chat(i: int, answer: str | None = None) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": answer or f"answer {i}"}]}


def jsonl(rows: list[Any]) -> bytes:
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows)


CHATS = [chat(i) for i in range(12)]
LOOSE = GenerationDatasetLimits(min_examples=1)


def refusal(data: bytes, **kw: Any) -> DatasetError:
    with pytest.raises(DatasetError) as caught:
        parse_dataset(data, **kw)
    return caught.value


# -- what is accepted -----------------------------------------------------------------------


def test_chats_and_completions_parse_and_repeats_are_dropped() -> None:
    ds = parse_dataset(jsonl(CHATS + [CHATS[3], chat(3, "another answer")]))
    assert ds.format == CHAT and len(ds) == 13 and ds.duplicates_dropped == 1 and ds.labels == ()
    assert ds.examples[0].source == "line 1" and ds.examples[-1].answer() == "another answer"
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(10)]
    comp = parse_dataset(jsonl(rows))
    assert comp.format == COMPLETION and comp.examples[9].completion == " c9"


@pytest.mark.parametrize("row,problem", [
    ({"messages": [{"role": "bot", "content": "hi"}]}, "'messages[0].role' is 'bot'; expected one of system, user, "
                                                     "assistant"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
     "'messages[0].content' is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]},
     "'messages[1].content' is only whitespace"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
     "'messages[1].content' must be a string, got an array"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]},
     "the chat has no assistant message"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "'messages[0]' is an assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "'messages[1]' is a system message"),
    ({"messages": [{"role": "system", "content": "s"}]}, "the chat has only a system message"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": "hello"}, "'messages' must be an array"),
    ({"messages": [{"role": "user"}]}, "'messages[0]' is missing field 'content'"),
    ({"messages": [{"role": "user", "content": "q", "name": "x"}]}, "'messages[0]' has unexpected field 'name'"),
    ({"messages": [], "extra": 1}, "unexpected field 'extra'"),
    ({"text": "x", "label": "y"}, "expected a 'messages' field (chat) or 'prompt' and 'completion' fields"),
    ([1, 2], "expected a JSON object"),
    ('{"messages": [', "not valid JSON"),
    ('{"prompt": "a", "prompt": "b", "completion": "c"}', "field 'prompt' appears more than once"),
])
def test_a_bad_row_is_refused_naming_its_line(row: Any, problem: str) -> None:
    err = refusal(jsonl(CHATS[:3] + [row] + CHATS[3:]))
    assert err.param == "line 4" and err.line == 4 and problem in err.message
    assert err.message.startswith("training file line 4: ")


@pytest.mark.parametrize("row,problem", [
    ({"prompt": "p"}, "missing field 'completion'"),
    ({"prompt": "p", "completion": 7}, "'completion' must be a string, got a number (7)"),
    ({"prompt": "p\x00", "completion": "c"}, "'prompt' contains a NUL character (at character 2)"),
    ({"prompt": "p", "completion": "c", "label": "x"}, "unexpected field 'label'; a completion example has exactly"),
])
def test_a_bad_completion_row_is_refused_naming_its_line(row: Any, problem: str) -> None:
    good = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(12)]
    err = refusal(jsonl(good[:1] + [row] + good[1:]))
    assert err.param == "line 2" and err.line == 2 and problem in err.message


def test_one_format_per_file_and_records_name_rows() -> None:
    err = refusal(jsonl(CHATS[:2] + [{"prompt": "p", "completion": "c"}]))
    assert err.param == "line 3" and "is a completion example, but line 1 started a chat dataset" in err.message
    with pytest.raises(DatasetError) as caught:
        from_records(CHATS[:5] + [{"messages": [{"role": "critic", "content": "x"}]}], limits=LOOSE)
    assert caught.value.param == "row 6" and caught.value.line is None


@pytest.mark.parametrize("data,limits,param,problem", [
    (b"", None, "file", "is empty"),
    (b"\xff\xfe{}", None, "line 1", "not valid UTF-8"),
    (b'[{"prompt": "p"}]', None, "file", "looks like a JSON array"),
    (jsonl(CHATS[:5]), None, "file", "has 5 examples; at least 10 are needed"),
    (jsonl(CHATS[:5] * 3), None, "file", "has 5 examples (after dropping 10 repeated); at least 10"),
    (jsonl(CHATS), GenerationDatasetLimits(dataset=DatasetLimits(max_rows=4)), "file", "more than 4 rows"),
    (jsonl(CHATS), GenerationDatasetLimits(dataset=DatasetLimits(max_bytes=100)), "file", "the limit is 100 bytes"),
    (jsonl([chat(0, "x" * 50)]), GenerationDatasetLimits(min_examples=1, dataset=DatasetLimits(max_text_chars=20)),
     "line 1", "'messages[1].content' is 50 characters; the limit is 20"),
    (jsonl([{"messages": [chat(0)["messages"][0]] * 4 + [chat(0)["messages"][1]]}]),
     GenerationDatasetLimits(min_examples=1, max_messages=3), "line 1", "'messages' has 5 messages; the limit is 3"),
])
def test_whole_file_limits_and_quotas(data: bytes, limits: GenerationDatasetLimits | None, param: str,
                                      problem: str) -> None:
    err = refusal(data, limits=limits)
    assert err.param == param and problem in err.message


def test_the_token_limit_applies_after_the_chat_template(tok: Any) -> None:
    long = chat(0, "word " * 40)
    n = len(encode(from_records([long], limits=LOOSE).examples[0], tok))
    assert n > 40  # the template's tokens count too
    ok = GenerationDatasetLimits(min_examples=1, max_example_tokens=n)
    assert len(parse_dataset(jsonl([long]), limits=ok, tokenizer=tok)) == 1
    short = GenerationDatasetLimits(min_examples=1, max_example_tokens=n - 1, tokenizer=tok)  # from the limits
    err = refusal(jsonl([chat(1), long]), limits=short)
    assert err.param == "line 2" and f"is {n} tokens after the chat template; the limit is {n - 1}" in err.message


def test_a_served_base_checks_every_length_at_upload_capped_at_its_context(tok: Any) -> None:
    """What the service uploads with (``limits_for_base``): the tenant's limits, the base's
    tokenizer, at most 2,048 tokens or the base's context if shorter."""
    tenant = DatasetLimits(max_rows=100, max_text_chars=20_000)
    limits = limits_for_base(tenant, tok, 8192)
    assert (limits.dataset, limits.tokenizer, limits.max_example_tokens) == (tenant, tok, 2048)
    long = chat(0, "word " * 2100)
    err = refusal(jsonl(CHATS[:3] + [long] + CHATS[3:]), limits=limits)
    assert err.param == "line 4" and "tokens after the chat template; the limit is 2,048" in err.message
    short = limits_for_base(tenant, tok, 64)
    assert short.max_example_tokens == 64
    assert refusal(jsonl(CHATS + [chat(1, "word " * 60)]), limits=short).param == "line 13"
    assert len(parse_dataset(jsonl(CHATS), limits=short)) == 12
    assert refusal(jsonl(CHATS[:9]), limits=short).param == "file"  # min_examples: still the default 10


# -- the loss mask --------------------------------------------------------------------------


def test_the_loss_mask_covers_every_assistant_turn_and_nothing_else(tok: Any) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"}]
    enc = encode(from_records([{"messages": msgs}], limits=LOOSE).examples[0], tok)
    pieces = [(tok.decode([i]), m) for i, m in zip(enc.input_ids, enc.loss_mask)]
    trained = [p for p, m in pieces if m]
    assert trained == ["Hello", "!", "<|im_end|>", "C", "iao", "<|im_end|>"]
    # the tokens are the template's own rendering (its trailing newline after the last turn dropped)
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert list(enc.input_ids) == full[: len(enc.input_ids)] and len(full) == len(enc.input_ids) + 1
    text = "".join(p for p, _ in pieces)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" \
                   "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>"
    masked_out = "".join(p for p, m in pieces if not m)
    assert "Hi" in masked_out and "Be brief." in masked_out and "Hello" not in masked_out
    # a served request for the last answer starts from exactly the tokens before it
    prompt = encode_prompt(from_records([{"messages": msgs}], limits=LOOSE).examples[0], tok)
    assert list(enc.input_ids[: len(prompt)]) == prompt and enc.loss_mask[len(prompt)]
    assert sum(enc.loss_mask[: len(prompt)]) == 3  # the first answer is in the second's prompt


def test_a_completion_trains_on_its_tokens_and_eos(tok: Any) -> None:
    ex = from_records([{"prompt": "2+2=", "completion": " four"}], limits=LOOSE).examples[0]
    enc = encode(ex, tok)
    p = tok("2+2=", add_special_tokens=False)["input_ids"]
    c = tok(" four", add_special_tokens=False)["input_ids"]
    assert list(enc.input_ids) == p + c + [tok.eos_token_id]
    assert list(enc.loss_mask) == [False] * len(p) + [True] * (len(c) + 1)


# -- split, stored form, files ---------------------------------------------------------------


def test_split_is_seeded_and_the_stored_form_reads_back() -> None:
    ds = parse_dataset(jsonl(CHATS + [CHATS[0]]))
    train, val = split(ds, fraction=0.25, seed=3)
    assert (len(train), len(val)) == (9, 3) and split(ds, fraction=0.25, seed=3) == (train, val)
    assert split(ds, fraction=0.25, seed=4) != (train, val)
    assert {e.key() for e in train.examples} | {e.key() for e in val.examples} == {e.key() for e in ds.examples}
    assert train.duplicates_dropped == 1 and check_validation(train, val) == 0 and check_validation(ds, val) == 3
    assert load(dump(ds)) == ds
    with pytest.raises(DatasetError, match="damaged"):
        load(dump(ds)[:-30])
    comp = GenerationDataset(tuple(from_records([{"prompt": "a", "completion": "b"}], limits=LOOSE).examples),
                             COMPLETION)
    with pytest.raises(DatasetError, match="holds completion examples but the training data holds chat"):
        check_validation(ds, comp)


def test_an_upload_is_validated_and_stored_as_a_generation_file(tmp_path: Path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'tailor.db'}")
    reg.create_tenant("acme")
    store = LocalStore(tmp_path / "store")
    files = Files(reg.engine, store)
    limits = TenantQuotas().dataset_limits()
    rec = files.upload("acme", "chats.jsonl", jsonl(CHATS + [CHATS[1]]), limits=limits, task=TEXT_GENERATION)
    assert (rec.task, rec.format, rec.rows, rec.labels, rec.duplicates_dropped) == (TEXT_GENERATION, "jsonl", 12, [], 1)
    again, ds = files.load("acme", rec.id)
    assert again == rec and ds.examples == parse_dataset(jsonl(CHATS)).examples
    assert task_data.task_of(ds) == TEXT_GENERATION
    with pytest.raises(DatasetError) as caught:
        files.upload("acme", "bad.jsonl", jsonl(CHATS[:4] + [{"messages": [{"role": "user", "content": "q"}]}]),
                     limits=limits, task=TEXT_GENERATION)
    assert caught.value.param == "line 5" and "no assistant message" in caught.value.message
    assert len(files.list("acme")) == 1 and len(store.list("tenants/")) == 1  # the refusal stored nothing
    assert get_task(TEXT_GENERATION).parse_dataset(jsonl(CHATS)) == parse_dataset(jsonl(CHATS))
