"""Text-generation datasets: chats or prompt/completion pairs, validated completely before anything trains.

Contract:

* Input is an uploaded JSON Lines file (``parse_dataset``) or an in-memory list of records
  (``from_records``). Each row is one example in one of two formats, and every row of a dataset
  is in the format of its first row:

  - **chat** (OpenAI's fine-tuning format): ``{"messages": [{"role": ..., "content": ...}, ...]}``.
    Roles are ``system``, ``user`` and ``assistant``; a ``system`` message may only come first;
    the first message after it is the ``user``'s; there is at least one ``assistant`` message.
    Every ``assistant`` message is trained on (multi-turn chats teach every answer).
  - **completion**: ``{"prompt": ..., "completion": ...}``; the completion is trained on.

  The result is a ``GenerationDataset`` or a ``DatasetError`` (code ``invalid_dataset``); nothing
  is half-accepted.
* Checks run in a fixed order and stop at the FIRST problem: size in bytes (before decoding),
  UTF-8, emptiness, then each row in file order (JSON, fields, roles, contents, and -- when a
  tokenizer is given -- the example's length in tokens after the chat template), then
  whole-dataset checks (enough examples). Errors read like the classification datasets'
  (``adapters.datasets``): ``param="line N"`` and ``.line == N`` for files (N: 1-based physical
  line), ``param="row N"`` for records, ``param="file"`` (or ``what``) for the whole dataset;
  a message's field is named in the text, e.g. ``'messages[2].content' is empty``.
  ``limits_for_base(tenant_limits, tokenizer, max_context)`` is what a service that holds the
  generation base uploads with: every example's templated length is then checked at upload
  (at most the default 2,048 tokens, or the base's context if shorter), so an over-long
  example is refused naming its line before anything is stored.
* Every text (a message's content, a prompt, a completion) is a string of at most
  ``dataset.max_text_chars`` characters that is not blank and holds no NUL or unpaired
  surrogate. ``dataset.max_rows`` counts rows as given (repeats included), so a huge file stops
  early; ``dataset.max_bytes`` bounds the upload. These three come from the tenant's quotas
  (``adapters.quotas``, as for every upload).
* An example repeating an earlier one exactly (same messages; same prompt and completion) is
  dropped and counted in ``duplicates_dropped``. The same prompt with another answer is kept:
  a prompt may have many good answers.
* ``encode(example, tokenizer)`` is the one tokenisation training, validation and the gate use:
  token ids and a loss mask that is True exactly on the tokens the model must learn to produce
  -- each assistant message's content and the end-of-turn token right after it (the chat
  template's own text, the system and user turns are masked out); for completions, the
  completion's tokens and the tokenizer's end-of-sequence token. A chat's prompt pieces are
  tokenised as the template renders them with ``add_generation_prompt=True``, i.e. exactly as a
  chat request is prompted when served; nothing after the last assistant turn is kept.
* ``split`` (a seeded shuffle) and ``overlap`` prepare the held-out validation set; ``dump`` /
  ``load`` are the stored form the job system keeps (one header line, then one example per line
  with the place it came from).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, Protocol

from adapters.datasets import (  # _*: the classification datasets' wording
    DatasetLimits, _kind, _s, _show, json_lines,
)
from adapters.errors import DatasetError

ROLES = ("system", "user", "assistant")
CHAT, COMPLETION = "chat", "completion"
FORMATS = (CHAT, COMPLETION)
STORED_FORMAT = "text-generation"
STORED_VERSION = 1
BOM = b"\xef\xbb\xbf"

_SURROGATE = re.compile(r"[\ud800-\udfff]")


class ChatTokenizer(Protocol):
    """What ``encode`` needs of a tokenizer (a Hugging Face tokenizer with a chat template)."""

    eos_token_id: int | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationExample:
    """One chat (``messages``) or one prompt/completion pair; ``source`` says where it came from
    ("line 7", "row 3"), so a later problem with it (its length on another base) can name it."""

    messages: tuple[Message, ...] = ()
    prompt: str = ""
    completion: str = ""
    source: str = ""

    @property
    def format(self) -> str:
        return CHAT if self.messages else COMPLETION

    def key(self) -> tuple[Any, ...]:
        """What makes two examples the same example (the repeat rule)."""
        if self.messages:
            return tuple((m.role, m.content) for m in self.messages)
        return ("\x00prompt", self.prompt, self.completion)

    def to_record(self) -> dict[str, Any]:
        if self.messages:
            return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}
        return {"prompt": self.prompt, "completion": self.completion}

    def prompt_messages(self) -> list[dict[str, str]]:
        """A chat's messages before its last assistant turn (what a served request would send)."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return [{"role": m.role, "content": m.content} for m in self.messages[:last]]

    def answer(self) -> str:
        """The text the model should produce last: the last assistant message, or the completion."""
        if self.messages:
            return next(m.content for m in reversed(self.messages) if m.role == "assistant")
        return self.completion


@dataclass(frozen=True)
class GenerationDataset:
    examples: tuple[GenerationExample, ...]
    format: str  # CHAT or COMPLETION: every example's
    duplicates_dropped: int = 0
    labels: tuple[str, ...] = field(default=(), init=False)  # generation has none (files/jobs show [])

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DatasetError(f"unknown generation dataset format {self.format!r}", param="format")
        if any(e.format != self.format for e in self.examples):
            raise DatasetError(f"every example of a {self.format} dataset must be a {self.format}", param="format")

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class GenerationDatasetLimits:
    """``dataset``: the limits that mean the same as for text classification (``max_rows``,
    ``max_text_chars`` per message, prompt or completion, ``max_bytes``; the tenant's quotas);
    the rest are generation's own. ``max_example_tokens`` applies when a tokenizer is given."""

    dataset: DatasetLimits = DatasetLimits()
    min_examples: int = 10
    max_messages: int = 100
    max_example_tokens: int = 2048
    # the base's tokenizer, when the caller has it (the service's generation base): then every
    # example's length in tokens is checked at upload, not only when a job trains on it
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("min_examples", "max_messages", "max_example_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GenerationDatasetLimits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Encoded:
    """One example as the model sees it: ``loss_mask[t]`` -- is ``input_ids[t]`` a token to learn?"""

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


# --- public entry points -----------------------------------------------------------------


def default_dataset_limits() -> GenerationDatasetLimits:
    """The limits ``parse_dataset`` applies when given none (no tokenizer: lengths are checked
    when a job encodes the data, naming the example's line)."""
    return GenerationDatasetLimits()


def limits_for_base(dataset: DatasetLimits, tokenizer: ChatTokenizer, max_context: int) -> GenerationDatasetLimits:
    """The limits of an upload for a served base: the tenant's ``dataset`` limits, the base's
    tokenizer (so every example's length after the chat template is checked at upload, naming
    its line, not first when a job encodes it) and ``max_example_tokens`` the default's, capped at
    the base's context (what a job's ``max_length`` is by default: an example over it could not
    train)."""
    default = GenerationDatasetLimits()
    return replace(default, dataset=dataset, tokenizer=tokenizer,
                   max_example_tokens=max(1, min(default.max_example_tokens, int(max_context))))


def parse_dataset(data: bytes, *, format: str | None = None, limits: GenerationDatasetLimits | None = None,
                  tokenizer: ChatTokenizer | None = None, what: str = "training file") -> GenerationDataset:
    """Parse and validate uploaded JSON Lines (``format``: None or ``"jsonl"``); with ``tokenizer``
    every example's templated length is checked against ``limits.max_example_tokens`` too."""
    limits = limits or GenerationDatasetLimits()
    tokenizer = tokenizer if tokenizer is not None else limits.tokenizer
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DatasetError(f"{what} must be bytes, got {type(data).__name__}", param="file")
    data = bytes(data)
    if len(data) > limits.dataset.max_bytes:
        raise DatasetError(f"{what} is {len(data):,} bytes; the limit is {limits.dataset.max_bytes:,} bytes",
                           param="file")
    if format is not None and (not isinstance(format, str) or format.strip().lower() not in ("jsonl", "json")):
        raise DatasetError(f"format must be 'jsonl' for text-generation data, got {format!r}", param="format")
    text = _decode(data, what)
    if not text.strip():
        raise DatasetError(f"{what} is empty", param="file")
    first = text.lstrip()[0]
    if first != "{":
        kind = "a JSON array" if first == "[" else "not JSON Lines"
        raise DatasetError(f"{what} looks like {kind}; upload JSON Lines: one "
                           '{"messages": [...]} or {"prompt": ..., "completion": ...} object per line', param="file")
    collector = _Collector(limits, what, unit="line", whole_param="file", tokenizer=tokenizer)
    for line_no, value in json_lines(text, collector):
        collector.add(value, line_no)
    return collector.finish()


def from_records(records: Any, *, limits: GenerationDatasetLimits | None = None,
                 tokenizer: ChatTokenizer | None = None, what: str = "training_data") -> GenerationDataset:
    """Validate an in-memory list of chat or prompt/completion records (``param="row N"``, 1-based)."""
    limits = limits or GenerationDatasetLimits()
    tokenizer = tokenizer if tokenizer is not None else limits.tokenizer
    if not isinstance(records, (list, tuple)):
        raise DatasetError(f"{what} must be a list of objects, got {_kind(records)}", param=what)
    if not records:
        raise DatasetError(f"{what} is empty", param=what)
    collector = _Collector(limits, what, unit="row", whole_param=what, tokenizer=tokenizer)
    for row_no, record in enumerate(records, start=1):
        collector.count_row(row_no)
        collector.add(record, row_no)
    return collector.finish()


def encode(example: GenerationExample, tokenizer: ChatTokenizer) -> Encoded:
    """Token ids and loss mask of ``example`` (see the module docstring)."""
    if not example.messages:
        prompt = _ids(tokenizer, example.prompt)
        answer = _ids(tokenizer, example.completion)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no end-of-sequence token: completions cannot be taught to stop")
        return Encoded(tuple(prompt + answer + [eos]), (False,) * len(prompt) + (True,) * (len(answer) + 1))
    msgs = [{"role": m.role, "content": m.content} for m in example.messages]
    ids: list[int] = []
    mask: list[bool] = []
    done = 0  # characters of the rendered chat already tokenised
    for i, m in enumerate(example.messages):
        if m.role != "assistant":
            continue
        prompt = _render(tokenizer, msgs[:i], generation_prompt=True)
        turn = _render(tokenizer, msgs[: i + 1], generation_prompt=False)
        if not turn.startswith(prompt) or len(prompt) < done:
            raise ValueError("the tokenizer's chat template does not render a chat as a prefix of its "
                             "continuation; assistant tokens cannot be located")
        # the answer: the message and the template's end of turn (its trailing whitespace is the template's)
        answer = turn[len(prompt):].rstrip()
        if m.content.strip() not in answer:
            raise ValueError("the tokenizer's chat template does not render assistant messages verbatim")
        head, body = _ids(tokenizer, prompt[done:]), _ids(tokenizer, answer)
        ids += head + body
        mask += [False] * len(head) + [True] * len(body)
        done = len(prompt) + len(answer)
    return Encoded(tuple(ids), tuple(mask))


def encode_prompt(example: GenerationExample, tokenizer: ChatTokenizer) -> list[int]:
    """The tokens a served request for ``example``'s last answer starts from: its chat before the
    last assistant turn with the generation prompt, or its prompt."""
    if not example.messages:
        return _ids(tokenizer, example.prompt)
    return _ids(tokenizer, _render(tokenizer, example.prompt_messages(), generation_prompt=True))


def encode_all(ds: GenerationDataset, tokenizer: ChatTokenizer, *, max_tokens: int,
               which: str = "training") -> list[Encoded]:
    """``encode`` every example; an example longer than ``max_tokens`` (or with nothing to learn)
    is a ``DatasetError`` naming its source."""
    out = []
    for e in ds.examples:
        enc = encode(e, tokenizer)
        problem = _length_problem(enc, max_tokens)
        if problem:
            raise DatasetError(f"{which} data {e.source or 'example'}: {problem}", param=e.source or which)
        out.append(enc)
    return out


def split(ds: GenerationDataset, *, fraction: float = 0.1, seed: int = 0) -> tuple[GenerationDataset,
                                                                                       GenerationDataset]:
    """``(train, validation)``: ``max(1, round(fraction * n))`` examples held out (at most n - 1),
    chosen by a shuffle seeded with ``seed``; both halves keep the file order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DatasetError(f"fraction must be between 0 and 1 (exclusive), got {fraction!r}", param="fraction")
    n = len(ds)
    if n < 2:
        raise DatasetError("cannot split off a validation set from fewer than 2 examples", param="validation")
    take = min(n - 1, max(1, math.floor(fraction * n + 0.5)))
    order = list(range(n))
    random.Random(f"{seed}\x00generation").shuffle(order)
    held = set(order[:take])
    train = tuple(e for i, e in enumerate(ds.examples) if i not in held)
    val = tuple(e for i, e in enumerate(ds.examples) if i in held)
    return GenerationDataset(train, ds.format, ds.duplicates_dropped), GenerationDataset(val, ds.format, 0)


def check_validation(train: GenerationDataset, validation: GenerationDataset, *,
                     what: str = "validation set") -> int:
    """A separate validation set must be non-empty and of the training set's format; returns how
    many of its examples also appear in training (their scores are optimistic)."""
    if len(validation) == 0:
        raise DatasetError(f"{what} is empty", param="validation")
    if validation.format != train.format:
        raise DatasetError(f"{what} holds {validation.format} examples but the training data holds "
                           f"{train.format} examples; use one format for both", param="validation")
    seen = {e.key() for e in train.examples}
    return sum(1 for e in validation.examples if e.key() in seen)


def dump(ds: GenerationDataset) -> bytes:
    """The stored form: a header line, then one record per example with its ``source``."""
    header = {"dataset": STORED_FORMAT, "version": STORED_VERSION, "format": ds.format, "examples": len(ds),
              "duplicates_dropped": ds.duplicates_dropped}
    lines = [json.dumps(header)] + [json.dumps({**e.to_record(), "source": e.source}, ensure_ascii=False)
                                    for e in ds.examples]
    return ("\n".join(lines) + "\n").encode()


def load(data: bytes) -> GenerationDataset:
    """Read back ``dump``'s form (validated on the way in: only its shape is checked)."""
    try:
        lines = data.decode("utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        header = json.loads(lines[0])
        if header.get("dataset") != STORED_FORMAT or header.get("version") != STORED_VERSION:
            raise ValueError(f"unknown header {str(header)[:200]}")
        if header["examples"] != len(lines) - 1:
            raise ValueError(f"the header counts {header['examples']} examples, the file has {len(lines) - 1}")
        examples = []
        for line in lines[1:]:
            row = json.loads(line)
            source = str(row.get("source", ""))
            if "messages" in row:
                msgs = tuple(Message(str(m["role"]), str(m["content"])) for m in row["messages"])
                examples.append(GenerationExample(messages=msgs, source=source))
            else:
                examples.append(GenerationExample(prompt=str(row["prompt"]), completion=str(row["completion"]),
                                                  source=source))
        return GenerationDataset(tuple(examples), header["format"], int(header["duplicates_dropped"]))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, DatasetError) as e:
        raise DatasetError(f"the stored text-generation dataset is damaged ({e}); upload it again",
                           param="file") from None


# --- internals ---------------------------------------------------------------------------


class _Collector:
    """Per-row checks, the repeat rule, limits; then the whole-dataset checks."""

    def __init__(self, limits: GenerationDatasetLimits, what: str, *, unit: str, whole_param: str,
                 tokenizer: ChatTokenizer | None) -> None:
        self.limits, self.what, self.unit, self.whole_param = limits, what, unit, whole_param
        self.tokenizer = tokenizer
        self.examples: list[GenerationExample] = []
        self.format: str | None = None
        self.format_row = 0
        self.seen: set[tuple[Any, ...]] = set()
        self.rows = 0
        self.duplicates = 0

    def fail(self, where: int, problem: str) -> NoReturn:
        raise DatasetError(f"{self.what} {self.unit} {where}: {problem}", param=f"{self.unit} {where}",
                           line=where if self.unit == "line" else None)

    def fail_whole(self, problem: str) -> NoReturn:
        raise DatasetError(f"{self.what} {problem}", param=self.whole_param)

    def count_row(self, where: int) -> None:
        self.rows += 1
        if self.rows > self.limits.dataset.max_rows:
            raise DatasetError(
                f"{self.what} has more than {self.limits.dataset.max_rows:,} rows (stopped at {self.unit} {where}); "
                f"the limit is {self.limits.dataset.max_rows:,}", param=self.whole_param,
                line=where if self.unit == "line" else None)

    def add(self, value: Any, where: int) -> None:
        if not isinstance(value, Mapping):
            self.fail(where, 'expected a JSON object like {"messages": [...]} or {"prompt": ..., "completion": ...}, '
                             f"got {_kind(value)}")
        keys = list(value.keys())
        fmt = CHAT if "messages" in keys else COMPLETION if ("prompt" in keys or "completion" in keys) else None
        if fmt is None:
            shown = ", ".join(_show(k) for k in keys[:5]) or "no fields"
            self.fail(where, f"expected a 'messages' field (chat) or 'prompt' and 'completion' fields, got {shown}")
        allowed = ("messages",) if fmt == CHAT else ("prompt", "completion")
        extra = [k for k in keys if k not in allowed]
        if extra:
            names = ", ".join(_show(k) for k in extra[:5]) + (", ..." if len(extra) > 5 else "")
            need = "exactly 'messages'" if fmt == CHAT else "exactly 'prompt' and 'completion'"
            self.fail(where, f"unexpected field{_s(len(extra))} {names}; a {fmt} example has {need}")
        if self.format is None:
            self.format, self.format_row = fmt, where
        elif fmt != self.format:
            self.fail(where, f"is a {fmt} example, but {self.unit} {self.format_row} started a {self.format} "
                             "dataset; use one format per file")
        example = self._chat(value["messages"], where) if fmt == CHAT else self._completion(value, where)
        key = example.key()
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen.add(key)
        if self.tokenizer is not None:
            problem = _length_problem(encode(example, self.tokenizer), self.limits.max_example_tokens)
            if problem:
                self.fail(where, problem)
        self.examples.append(example)

    def _chat(self, messages: Any, where: int) -> GenerationExample:
        if not isinstance(messages, list):
            self.fail(where, f"'messages' must be an array of {{\"role\", \"content\"}} objects, got {_kind(messages)}")
        if not messages:
            self.fail(where, "'messages' is empty")
        if len(messages) > self.limits.max_messages:
            self.fail(where, f"'messages' has {len(messages):,} messages; the limit is {self.limits.max_messages:,}")
        out = []
        for i, m in enumerate(messages):
            name = f"messages[{i}]"
            if not isinstance(m, Mapping):
                self.fail(where, f"'{name}' must be an object with 'role' and 'content', got {_kind(m)}")
            extra = [k for k in m if k not in ("role", "content")]
            if extra:
                self.fail(where, f"'{name}' has unexpected field {_show(extra[0])}; a message has exactly "
                                 "'role' and 'content'")
            for f in ("role", "content"):
                if f not in m:
                    self.fail(where, f"'{name}' is missing field '{f}'")
            role = m["role"]
            if not isinstance(role, str) or role not in ROLES:
                shown = _show(role) if isinstance(role, str) else _kind(role)
                self.fail(where, f"'{name}.role' is {shown}; expected one of {', '.join(ROLES)}")
            if role == "system" and i:
                self.fail(where, f"'{name}' is a system message; only the first message may be one")
            self._text(m["content"], f"{name}.content", where)
            out.append(Message(role, m["content"]))
        first = 1 if out[0].role == "system" else 0
        if first >= len(out):
            self.fail(where, "the chat has only a system message; it needs a user message and an assistant answer")
        if out[first].role != "user":
            self.fail(where, f"'messages[{first}]' is an assistant message; a chat starts with the user's "
                             "(after an optional system message)")
        if not any(m.role == "assistant" for m in out):
            self.fail(where, "the chat has no assistant message: there is nothing to learn")
        return GenerationExample(messages=tuple(out), source=f"{self.unit} {where}")

    def _completion(self, value: Mapping[str, Any], where: int) -> GenerationExample:
        for f in ("prompt", "completion"):
            if f not in value:
                self.fail(where, f"missing field '{f}'")
            self._text(value[f], f, where)
        return GenerationExample(prompt=value["prompt"], completion=value["completion"],
                                 source=f"{self.unit} {where}")

    def _text(self, text: Any, name: str, where: int) -> None:
        if not isinstance(text, str):
            self.fail(where, f"'{name}' must be a string, got {_kind(text)}")
        if not text:
            self.fail(where, f"'{name}' is empty")
        if not text.strip():
            self.fail(where, f"'{name}' is only whitespace")
        limit = self.limits.dataset.max_text_chars
        if len(text) > limit:
            self.fail(where, f"'{name}' is {len(text):,} characters; the limit is {limit:,}")
        if "\x00" in text:
            self.fail(where, f"'{name}' contains a NUL character (at character {text.index(chr(0)) + 1})")
        if _SURROGATE.search(text):
            self.fail(where, f"'{name}' contains an unpaired UTF-16 surrogate")

    def finish(self) -> GenerationDataset:
        if not self.examples:
            self.fail_whole("has no examples")
        need = self.limits.min_examples
        if len(self.examples) < need:
            repeats = f" (after dropping {self.duplicates} repeated)" if self.duplicates else ""
            self.fail_whole(f"has {len(self.examples)} example{_s(len(self.examples))}{repeats}; "
                            f"at least {need} are needed to train and validate")
        assert self.format is not None
        return GenerationDataset(tuple(self.examples), self.format, self.duplicates)


def _length_problem(enc: Encoded, max_tokens: int) -> str | None:
    if len(enc) > max_tokens:
        return f"the example is {len(enc):,} tokens after the chat template; the limit is {max_tokens:,}"
    if not enc.trained_tokens:
        return "the example has no tokens to learn after tokenisation"
    return None


def _render(tokenizer: ChatTokenizer, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _ids(tokenizer: ChatTokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(data: bytes, what: str) -> str:
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DatasetError(f"{what} line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x}); save it as UTF-8",
                           param=f"line {line}", line=line) from None

