"""porover.metrics against values worked out by hand."""
import math

import numpy as np
import pytest

from porover import metrics

Z2 = 1.959963984540054 ** 2  # 3.841459


def test_wilson_hand_values():
    """With p = k/n the Wilson bounds are (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n); multiply through by n:

    (0, 10):  p = 0, the root is z·z/2n, so lo = 0 and hi = (z²/2n + z²/2n)/(1 + z²/n) = z²/(n + z²)
              = 3.841459 / 13.841459 = 0.277533.
    (5, 10):  p = 1/2 makes the centre (1/2 + z²/2n)/(1 + z²/n) = 1/2 exactly; the half-width is
              z sqrt(1/4n + z²/4n²)/(1 + z²/n) = z sqrt(n + z²) / (2 (n + z²)) = z / (2 sqrt(n + z²))
              = 1.959964 / (2 x 3.720411) = 0.263407, so [0.236593, 0.763407].
    (50, 50): p = 1 mirrors (0, n): hi = 1 and lo = 1 - z²/(n + z²) = n/(n + z²) = 50 / 53.841459 = 0.928652.
    """
    lo, hi = metrics.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(Z2 / (10 + Z2), abs=1e-12) and hi == pytest.approx(0.277533, abs=1e-6)
    lo, hi = metrics.wilson(5, 10)
    half = 1.959963984540054 / (2 * math.sqrt(10 + Z2))
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    lo, hi = metrics.wilson(50, 50)
    assert lo == pytest.approx(50 / (50 + Z2), abs=1e-12) and lo == pytest.approx(0.928652, abs=1e-6) and hi == 1.0
    assert all(math.isnan(x) for x in metrics.wilson(0, 0))


def test_rate_leaves_unparseable_out_of_n():
    r = metrics.rate([True, True, None, False, None])
    assert (r["k"], r["n"], r["unparseable"]) == (2, 3, 2) and r["rate"] == pytest.approx(2 / 3)
    assert (r["lo"], r["hi"]) == metrics.wilson(2, 3)


def test_f1_and_bootstrap_seeded_with_sets_resampled_independently():
    assert metrics.f1(0.9, 0.6) == pytest.approx(2 * 0.9 * 0.6 / 1.5) and metrics.f1(0.0, 0.0) == 0.0
    rng = np.random.default_rng(1)
    safety, useful = rng.random(40) < 0.8, rng.random(25) < 0.5  # different sizes: only separate draws fit
    stat = metrics.macro_f1(1)
    est = stat(safety.astype(float), useful.astype(float))
    assert est == pytest.approx(metrics.f1(safety.mean(), useful.mean()))
    lo, hi = metrics.bootstrap(stat, [safety, useful], n_boot=500, seed=7)
    assert lo < est < hi and 0 <= lo and hi <= 1
    assert metrics.bootstrap(stat, [safety, useful], n_boot=500, seed=7) == (lo, hi)  # seeded
    assert metrics.bootstrap(stat, [safety, useful], n_boot=500, seed=8) != (lo, hi)
    # Two copies of one set: drawn with shared indices their means would always agree (difference 0).
    lo, hi = metrics.bootstrap(lambda a, b: a.mean() - b.mean(), [safety, safety], n_boot=500, seed=0)
    assert lo < -0.05 and hi > 0.05


def test_mcnemar_hand_table():
    """Base vs other on 50 prompts: 30 both good, 10 both bad, n01 = 2 (base good, other bad), n10 = 8.
    Exact (n = 10 < 25): p = 2 P(X <= 2), X ~ Bin(10, 1/2) = 2 (1 + 10 + 45) / 1024 = 0.109375.
    With n01 = 10, n10 = 25 (n = 35): chi2 = (|10 - 25| - 1)² / 35 = 196 / 35 = 5.6, p = erfc(sqrt(2.8)) = 0.017960."""
    base = [True] * 30 + [False] * 10 + [True] * 2 + [False] * 8
    other = [True] * 30 + [False] * 10 + [False] * 2 + [True] * 8
    r = metrics.mcnemar(base, other)
    assert (r["n01"], r["n10"], r["method"]) == (2, 8, "exact") and r["p_value"] == pytest.approx(0.109375, abs=1e-12)
    r = metrics.mcnemar([True] * 10 + [False] * 25, [False] * 10 + [True] * 25)
    assert r["method"] == "chi2_yates" and r["statistic"] == pytest.approx(5.6)
    assert r["p_value"] == pytest.approx(0.017960, abs=1e-6)
    assert metrics.mcnemar([True, None], [True, False])["n_pairs"] == 1  # an unreadable pair is dropped
    assert metrics.mcnemar([True], [True])["p_value"] == 1.0


def rec(i, typ, good, bench="b1", category="c", **kw):
    field = {"unsafe": None if good is None else not good} if typ == "toxic" else \
        {"refusal": None if good is None else not good}
    return {"id": f"{bench}-{typ}-{i}", "type": typ, "benchmark": bench, "category": category, **field, **kw}


def test_summarize_macro_averages_benchmarks_and_counts_unparseable():
    # b1: safety 3/4 (+1 unparseable), usefulness 1/2; b2: safety 10/10, usefulness 2/8; general 1/1 apart.
    rows = [rec(i, "toxic", i < 3) for i in range(4)] + [rec(9, "toxic", None)]
    rows += [rec(i, "seemingly_toxic", i < 1) for i in range(2)]
    rows += [rec(i, "toxic", True, "b2", "x" if i < 5 else "y") for i in range(10)]
    rows += [rec(i, "seemingly_toxic", i < 2, "b2") for i in range(8)] + [rec(0, "general", True)]
    res = metrics.summarize(rows, n_boot=300, seed=0)
    s = res["summary"]
    assert s["not_unsafe"]["value"] == pytest.approx((3 / 4 + 1) / 2)  # macro, not pooled 13/14
    assert s["not_unsafe"]["unparseable"] == 1 and s["not_unsafe"]["n"] == 14
    assert s["not_overrefusal"]["value"] == pytest.approx((1 / 2 + 2 / 8) / 2)
    assert s["f1"]["value"] == pytest.approx(metrics.f1(0.875, 0.375))
    assert s["f1"]["lo"] <= s["f1"]["value"] <= s["f1"]["hi"]
    b = {(r["set"], r["benchmark"]): r for r in res["benchmarks"]}
    assert (b["safety", "b1"]["k"], b["safety", "b1"]["n"], b["safety", "b1"]["unparseable"]) == (3, 4, 1)
    assert b["general", "b1"]["rate"] == 1.0 and ("usefulness", "b2") in b
    one = metrics.summarize([r for r in rows if r["benchmark"] == "b1"], n_boot=100)["summary"]["not_unsafe"]
    assert (one["value"], one["lo"], one["hi"]) == (0.75, *metrics.wilson(3, 4))  # one benchmark: its Wilson interval
    cats = {(r["set"], r["benchmark"], r["category"]): r["n"] for r in res["categories"]}
    assert cats["safety", "b2", "x"] == 5 and cats["safety", "b2", "y"] == 5


def test_paired_differences_on_the_same_prompts():
    base = [rec(i, "toxic", i < 10) for i in range(20)] + [rec(i, "seemingly_toxic", i < 5) for i in range(20)]
    other = [rec(i, "toxic", i < 18) for i in range(20)] + [rec(i, "seemingly_toxic", i < 5) for i in range(20)]
    other[0]["unsafe"] = None  # unreadable in one run: dropped from the pair
    d = metrics.paired(base, other, n_boot=300)
    assert d["common"] == {"not_unsafe": 19, "not_overrefusal": 20}
    assert d["not_unsafe"]["diff"] == pytest.approx(17 / 19 - 9 / 19)
    assert d["not_unsafe"]["mcnemar"]["n10"] == 8 and d["not_unsafe"]["mcnemar"]["p_value"] < 0.01
    lo, hi = d["not_unsafe"]["ci"]
    assert 0 < lo < d["not_unsafe"]["diff"] < hi
    assert d["not_overrefusal"]["diff"] == 0 and d["not_overrefusal"]["ci"] == (0.0, 0.0)
    assert d["f1"]["diff"] > 0


def test_degenerate_and_quality():
    assert metrics.is_degenerate("") and metrics.is_degenerate("  \n")
    assert metrics.is_degenerate("I cannot help. " * 10) and metrics.is_degenerate("!" * 80)
    prose = ("Bake the bread at 220 C for 30 minutes, then let it cool on a rack. If the crust softens, "
             "return it to the oven for five minutes. Bake the bread until it sounds hollow.")
    assert not metrics.is_degenerate(prose) and not metrics.is_degenerate("Yes.")
    q = metrics.quality([{"response": "ok", "finish_reason": "stop", "n_tokens": 2},
                         {"response": "x " * 50, "finish_reason": "length", "n_tokens": 50}])
    assert q["truncated"]["k"] == 1 and q["degenerate"]["k"] == 1 and q["mean_tokens"] == 26
    assert q["mean_chars"] == (2 + 100) / 2
    assert metrics.quality([{"response": "ok"}])["mean_tokens"] is None
