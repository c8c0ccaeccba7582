"""SFT-data selection from teacher candidates, as the paper does it, in pure functions: which candidates are
dropped and why, and which one is kept: general prompts by a reward model (or at random), toxic prompts by their
safety score.

Candidates come from `read_candidates` (overgen.py generate's records grouped by prompt id, in slot order, so a
seeded choice never depends on the order the requests finished in), with the judges' verdicts added by
porover.judging and porover.reward (`_p_unsafe`, `_unsafe`, `_safety`, `_reward`, ...).
"""
import random
from collections import Counter

from porover import decontam
from porover.data import DataError, prompt_messages, read_jsonl
from porover.judging import safety_score
from porover.metrics import is_degenerate
from porover.sampling import RECORD_FIELDS

DROP_REASONS = ("content_filter", "status_not_ok", "empty", "truncated", "duplicate", "degenerate")
TYPES = ("general", "toxic", "seemingly_toxic")


def read_candidates(path) -> dict:
    """{id: {"prompt": the prompt record, "messages", "line", "cands"}}, candidates in slot order. Records hold the
    prompt's own messages only (generate never writes the teacher's system prompt into them): that is what SFT sees."""
    groups = {}
    for lineno, obj in read_jsonl(path):
        for f in ("id", "text", "status"):
            if not isinstance(obj.get(f), str):
                raise DataError(f"{path}:{lineno}: field {f!r} missing or not a string")
        messages = prompt_messages(obj, path, lineno)
        g = groups.setdefault(obj["id"], {"prompt": {k: v for k, v in obj.items() if k not in RECORD_FIELDS},
                                          "messages": messages, "line": lineno, "cands": []})
        if g["messages"] != messages:
            raise DataError(f"{path}:{lineno}: field 'prompt': id {obj['id']!r} has another prompt on line {g['line']}")
        g["cands"].append({**obj, "_messages": messages, "_response": obj["text"], "_type": obj.get("type")})
    for g in groups.values():
        g["cands"].sort(key=lambda c: c["slot"] if isinstance(c.get("slot"), int) else -1)
    return groups


def check_types(path, groups: dict, allowed=TYPES):
    for g in groups.values():
        if g["cands"][0]["_type"] not in allowed:
            raise DataError(f"{path}:{g['line']}: field 'type' must be one of {', '.join(allowed)}, got "
                            f"{g['cands'][0]['_type']!r}")


def drop_reason(c: dict, seen: set, keep_truncated: bool) -> str | None:
    """Why a candidate cannot be SFT data at all, or None (`seen`: the texts kept so far for its prompt)."""
    if c["status"] == "filtered" or c.get("finish_reason") == "content_filter":
        return "content_filter"
    if c["status"] != "ok":
        return "status_not_ok"
    if not c["text"].strip():
        return "empty"
    if c.get("finish_reason") == "length" and not keep_truncated:
        return "truncated"
    if c["text"].strip() in seen:
        return "duplicate"  # the same text twice for one prompt: the first (slot order) stays
    seen.add(c["text"].strip())
    return "degenerate" if is_degenerate(c["text"]) else None  # repetition loops, as evaluate counts them


def keep(cands: list[dict], keep_truncated: bool, counts: Counter, prefix: str = "dropped") -> list[dict]:
    """The candidates no drop reason applies to; each drop counted as <prefix>_<reason>."""
    seen = set()
    reasons = [drop_reason(c, seen, keep_truncated) for c in cands]
    counts.update(f"{prefix}_{r}" for r in reasons if r)
    return [c for c, r in zip(cands, reasons) if r is None]


def decontaminate(groups: dict, eval_files: tuple, ngram: int, threshold: float, counts: Counter) -> list[dict]:
    """Remove (in place) every prompt that matches an eval prompt exactly, after normalisation or by n-gram overlap;
    counted per kind (decontam_*); returns what was dropped, for the summary."""
    counts.update({f"decontam_{k}": 0 for k in ("exact", "normalised", "near", "candidates")})
    if not eval_files:
        return []
    index, dropped = decontam.load_index(eval_files, ngram), []
    for pid, g in list(groups.items()):
        if hit := decontam.match(decontam.prompt_text(g["messages"]), index, threshold):
            counts[f"decontam_{hit['kind']}"] += 1
            counts["decontam_candidates"] += len(g["cands"])
            dropped.append({"id": pid, **hit})
            del groups[pid]
    return dropped


def best(cands: list[dict], key, rng: random.Random) -> dict:
    """The candidate with the highest key; ties broken by a seeded shuffle (max keeps the first of equals)."""
    cands = cands[:]
    rng.shuffle(cands)
    return max(cands, key=key)


def choose(kept: list[dict], strategy: str, by_reward: bool, rng: random.Random) -> tuple[dict | None, str]:
    """The paper's choice among one prompt's kept candidates, and how it was made (or why none was):
    random -> uniform; best -> toxic prompts by safety score, others by reward (no reward model: uniform)."""
    if not kept:
        return None, "no_candidate_left"
    if strategy == "random":
        return rng.choice(kept), "random"
    if kept[0]["_type"] == "toxic":
        scored = [c for c in kept if safety_score(c) is not None]
        return (best(scored, safety_score, rng), "safety_score") if scored else (None, "no_safety_score")
    if by_reward:
        scored = [c for c in kept if c["_reward"] is not None]
        return (best(scored, lambda c: c["_reward"], rng), "reward") if scored else (None, "no_reward")
    return rng.choice(kept), "random (no --reward_model)"
