"""bench.http's mixed-length traffic: the share of long texts a client draws, and their length."""

from __future__ import annotations

import pytest

from adapters.base import tiny_base
from bench.http import LONG_WORDS, mixed_corpus, texts


def test_the_mixed_corpus_has_the_asked_share_of_long_texts() -> None:
    corpus = mixed_corpus(256, 0.03)
    lengths = [len(t.split()) for t in corpus]
    long = [n for n in lengths if n >= LONG_WORDS[0]]
    assert len(long) == 8 and len(corpus) == 264  # 8 / 264 = 3.0%
    assert all(16 <= n <= 40 for n in lengths if n < LONG_WORDS[0])
    assert corpus == mixed_corpus(256, 0.03)  # seeded
    assert corpus.index(next(t for t in corpus if len(t.split()) >= LONG_WORDS[0])) < 250  # shuffled in
    assert mixed_corpus(256, 0.0) == texts(256)  # no share: the plain corpus, unchanged
    n_tokens = len(tiny_base().tokenizer(next(t for t in corpus if len(t.split()) >= LONG_WORDS[0]))["input_ids"])
    assert n_tokens > 256  # cut at any adapter max_length up to the base's


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(SystemExit, match="--long-share"):
        mixed_corpus(10, share)
