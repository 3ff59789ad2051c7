"""bench.length_mix on a tiny base: every case answers, widths follow each adapter's max_length."""

from __future__ import annotations

from adapters.base import tiny_base
from bench.length_mix import CASES, ROWS, measure

SHORT = ["great flight", "lost my bag again", "ok"]
LONG = [" ".join(["a long review that goes on"] * 40)]  # ~240 tokens


def test_every_case_is_timed_and_a_long_adapter_widens_the_batch_it_joins(tmp_path):
    base = tiny_base(seed=1)  # 128 positions: a 256-token adapter is cut to them
    res = measure(base, SHORT, LONG, tmp_path, rounds=1)
    cases = res["cases"]
    assert set(cases) == set(CASES) and res["rows"] == ROWS
    assert cases["short"]["width"] < 16 and cases["short"]["padding_share"] < 0.5
    assert cases["mixed@128"]["width"] == 128 and cases["mixed@256"]["width"] == 128  # capped at the positions
    assert cases["mixed@128"]["padding_share"] > 0.9  # one long row pads the 31 short ones
    assert cases["long@128"]["padding_share"] == 0.0 and cases["long@128"]["real_tokens"] == ROWS * 128
    assert cases["mixed@128"]["split_passes"] == [[ROWS - 1, cases["short"]["width"]], [1, 128]]
    assert cases["short"]["split_passes"] == [[ROWS, cases["short"]["width"]]]
    for c in cases.values():
        assert c["one_pass_median_s"] > 0 and c["split_median_s"] > 0 and c["split_vs_one_pass"] > 0
    assert set(res["paired"]) == {f"{mode}/{name}@256_vs_@128" for mode in ("one_pass", "split")
                                  for name in ("mixed", "quarter", "long")}
