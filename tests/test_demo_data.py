"""The data/demo prompt sets (data/demo/README.md): sizes, record shape, ids, category spread, and no
duplicate or near-duplicate prompt anywhere in the nine files or against the SFT seed set, by porover's own
decontamination tests (exact, normalised, near)."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from porover import decontam

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
TYPES = {"general": "gen", "toxic": "tox", "seemingly_toxic": "st"}
SPLITS = ("train", "dev", "eval")
MIN_ROWS = {
    "general": {"train": 200, "dev": 40, "eval": 60},
    "toxic": {"train": 120, "dev": 40, "eval": 100},
    "seemingly_toxic": {"train": 120, "dev": 40, "eval": 100},
}
FIELDS = {"id", "prompt", "type", "category", "label"}


def _load():
    sets = {}
    for t in TYPES:
        for s in SPLITS:
            path = DEMO / f"{t}_{s}.jsonl"
            with open(path, encoding="utf-8") as f:
                sets[(t, s)] = [json.loads(line) for line in f if line.strip()]
    return sets


SETS = _load()


def _seed_prompts():
    with open(DEMO / "sft_seed.jsonl", encoding="utf-8") as f:
        return [(f"sft_seed.jsonl:{o['id']}", o["prompt"]) for o in map(json.loads, f) if "prompt" in o]


def test_rows_per_type_and_split():
    for t, splits in MIN_ROWS.items():
        for s, n in splits.items():
            assert len(SETS[(t, s)]) >= n, f"{t}_{s}.jsonl has {len(SETS[(t, s)])} rows, want at least {n}"
    assert len(SETS[("toxic", "eval")]) >= 100 and len(SETS[("seemingly_toxic", "eval")]) >= 100


def test_record_shape_type_and_label():
    for (t, s), rows in SETS.items():
        for r in rows:
            assert set(r) == FIELDS, (t, s, r)
            assert r["type"] == t, r
            assert r["label"] == ("unsafe" if t == "toxic" else "safe"), r
            assert isinstance(r["prompt"], str) and r["prompt"].strip() == r["prompt"] and r["prompt"], r
            assert isinstance(r["category"], str) and re.fullmatch(r"[a-z_]+", r["category"]), r


def test_ids_unique_sequential_and_prefixed():
    ids = Counter(r["id"] for rows in SETS.values() for r in rows)
    assert not [i for i, n in ids.items() if n > 1]
    for (t, s), rows in SETS.items():
        assert [r["id"] for r in rows] == [f"{TYPES[t]}-{s}-{i:03d}" for i in range(1, len(rows) + 1)], (t, s)


def test_every_category_in_every_split():
    for t in TYPES:
        cats = {s: Counter(r["category"] for r in SETS[(t, s)]) for s in SPLITS}
        all_cats = set().union(*cats.values())
        assert len(all_cats) >= 8, (t, all_cats)
        for s in SPLITS:
            assert not all_cats - set(cats[s]), f"{t}_{s}.jsonl lacks categories {sorted(all_cats - set(cats[s]))}"
            assert max(cats[s].values()) <= len(SETS[(t, s)]) // 3, (t, s, cats[s])


def _first_match(prompts, index=None):
    """(name, match) for the first prompt that `decontam.match` flags: against `index` when given, else
    against the prompts before it in the list (every test is symmetric, so this covers every pair once)."""
    for i, (name, text) in enumerate(prompts):
        m = decontam.match(text, index if index is not None else decontam.build_index(prompts[:i]))
        if m:
            return name, m
    return None


def test_no_duplicates_or_near_duplicates():
    """Within each file: each prompt against the ones before it. Across files (and against sft_seed.jsonl):
    each file's prompts against an index of every other set."""
    groups = {f"{t}_{s}.jsonl": [(f"{t}_{s}.jsonl:{r['id']}", r["prompt"]) for r in rows]
              for (t, s), rows in SETS.items()}
    groups["sft_seed.jsonl"] = _seed_prompts()
    for name, prompts in groups.items():
        within = _first_match(prompts)
        assert within is None, within
        others = decontam.build_index([p for other, ps in groups.items() if other != name for p in ps])
        across = _first_match(prompts, others)
        assert across is None, across


@pytest.mark.parametrize("a,b", [
    ("How do I kill a Python process?", "how do I KILL a python process"),  # normalised
    ("Write a short poem about the first snowfall of winter.",
     "Please write a short poem about the first snowfall of winter, with rhymes."),  # near
])
def test_the_duplicate_check_catches(a, b):
    assert _first_match([("a", a), ("b", b)]) is not None
