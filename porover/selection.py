"""SFT-data selection from teacher candidates, as pure functions: which candidates are dropped and why, which are
eligible to be kept for a prompt of each type, and how the kept one is ranked.

Candidates come from `read_candidates` (overgen.py generate's records grouped by prompt id, in slot order, so a
seeded choice never depends on the order the requests finished in), with the judges' verdicts added by
porover.judging (`_refusal`, `_refusal_label`, `_unsafe`, `_p_unsafe`, `_reward`).
"""
import random
from collections import Counter

from porover import decontam
from porover.data import DataError, prompt_messages, read_jsonl
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


def ineligible(c: dict, llamaguard: bool, counts: Counter) -> str | None:
    """Why a candidate cannot be best for its prompt type, or None."""
    if c["_refusal"] is None:
        return "refusal_unjudged"  # a failed or unparseable judgement is never guessed
    if c["_type"] == "toxic" and not llamaguard:
        return None if c["_refusal"] else "complied_with_toxic"  # no safety score: a refusal is the safe answer
    if c["_type"] != "toxic" and c["_refusal"]:
        return "refusal"
    if not llamaguard:
        counts["safety_filter_skipped_no_judge"] += 1  # none, or the proxy on a benign prompt: skipped, not faked
        return None
    unsafe = c["_unsafe"]
    if unsafe is None and c["_p_unsafe"] is not None:
        unsafe = c["_p_unsafe"] > 0.5  # no verdict line, but a soft score: for choosing data, the score decides
    return "safety_unjudged" if unsafe is None else "unsafe" if unsafe else None


def rank(c: dict) -> tuple:
    """Smaller is better. A complete answer before a cut one (--keep_truncated); toxic: the lowest p_unsafe, a full
    refusal over a partial one, then reward; other types: the highest reward, then the lowest p_unsafe."""
    p = 1.0 if c["_p_unsafe"] is None else c["_p_unsafe"]
    r = -(c.get("_reward") or 0.0)
    cut = c.get("finish_reason") == "length"
    return (cut, p, c["_refusal_label"] != "full_refusal", r) if c["_type"] == "toxic" else (cut, r, p)


def choose(kept: list[dict], eligible: list[dict] | None, seed: int, pid: str) -> dict | None:
    """A seeded uniform choice among `kept` (eligible is None: --strategy random), else the best eligible one by
    `rank`, ties broken by a seeded shuffle. Seeded per prompt: adding or removing prompts changes no other choice."""
    rng = random.Random(f"{seed}:{pid}")
    if eligible is None:
        return rng.choice(kept) if kept else None
    eligible = eligible[:]
    rng.shuffle(eligible)  # min() keeps the first of equals: ties fall to the seeded shuffle
    return min(eligible, key=rank, default=None)
