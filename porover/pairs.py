"""POROver's preference pairs (Karaman et al., v1 §3.2 and Fig. 2), from judged candidates: pure functions, so
every threshold is tested on hand-made inputs.

Seemingly toxic prompts. The target model (the SFT student) answers each prompt K times (the paper: once, at
temperature 0.1, top_p 0.95); with r(x) the share of those answers judged refusals, x is overrefused when
r(x) >= tau_refusal (with K = 1: when its answer is a refusal). Then
    rejected = one of the student's refusals of x (a refusal shows in its first words: it may be cut short)
    chosen   = the best of the teacher's candidates for x by a reward model, after dropping those judged refusals
               and those cut at the length limit (no reward model: a seeded random choice, labelled so)

Toxic prompts. The teacher's candidates, each with a safety score s (porover.judging.safety_score: Llama Guard's
normalised p(safe), or offline the refusal proxy, 1 for a refusal and 0 for a compliance), are contrastive under
the containment threshold tau when some candidate has s < tau and another has s > 1 - tau; then
    chosen = the safest complete candidate, rejected = the least safe other one (ties: a seeded choice)
The paper picked tau = 0.01 from {0, 0.01, 0.03, 0.1, 0.5} on validation (tau = 0 builds no toxic pair).

A candidate is a dict from porover.selection.read_candidates after porover.judging ran (lists in slot order, so
seeded choices do not depend on the order a file was written in): "text", "slot", "status", "finish_reason",
"_refusal" (None when unjudged), "_refusal_label", "_p_unsafe", "_safety", "_unsafe", and "_reward" where a reward
model ran. Each function returns (pair or None, outcome): the outcome names the first filter a prompt failed.
"""
import random

from porover.judging import safety_score
from porover.selection import best


def usable(c: dict) -> bool:
    """A sample the judges can read. Duplicates stay: a student that refuses the same way twice refused twice."""
    return c["status"] == "ok" and bool(c["text"].strip())


def complete(c: dict) -> bool:
    """Not cut at the length limit. A chosen text must be complete (the pair teaches the student to say it, and to
    stop) unless the caller keeps cut ones (`keep_truncated`, for short generation budgets); a cut rejected text is
    fine (its opening is what the pair pushes down). A cut side is marked "chosen_truncated" or
    "rejected_truncated" in its row, and training adds no end-of-turn token after the cut."""
    return c.get("finish_reason") != "length"


def student_refusals(student: list[dict], k: int) -> tuple[list[dict] | None, str]:
    """The refusals among the student's samples in slots 0..k-1, or None with why when r(x) is not known:
    fewer than k usable samples, or one the judge could not label (never guessed)."""
    samples = [c for c in student if c["slot"] < k and usable(c)]
    if len(samples) < k:
        return None, "student_fewer_than_k"
    if any(c["_refusal"] is None for c in samples):
        return None, "student_unjudged"
    return [c for c in samples if c["_refusal"]], "ok"


def overrefusal_pair(student: list[dict], teacher: list[dict], k: int, tau_refusal: float, by_reward: bool,
                     rng: random.Random, keep_truncated: bool = False) -> tuple[dict | None, str]:
    """The pair for one seemingly toxic prompt: (the teacher's best compliant answer, the student's refusal);
    best by "_reward" when `by_reward` (a candidate whose score failed is left out), else a seeded choice."""
    refusals, why = student_refusals(student, k)
    if refusals is None:
        return None, why
    fraction = len(refusals) / k
    if not refusals or fraction < tau_refusal:
        return None, "not_overrefused"
    answers = [c for c in teacher if usable(c) and (keep_truncated or complete(c)) and c["_refusal"] is False]
    if not answers:
        return None, "no_compliant_teacher_answer"
    if by_reward:
        answers = [c for c in answers if c["_reward"] is not None]
        if not answers:
            return None, "no_scored_teacher_answer"
    chosen = best(answers, lambda c: c["_reward"], rng) if by_reward else rng.choice(answers)
    return {"chosen": chosen, "rejected": rng.choice(refusals), "refusal_fraction": fraction}, "pair"


def toxic_pair(teacher: list[dict], tau: float, rng: random.Random,
               keep_truncated: bool = False) -> tuple[dict | None, str]:
    """The pair for one toxic prompt: (the safest complete teacher candidate, the least safe other one), when they
    are contrastive."""
    scored = [c for c in teacher if usable(c) and safety_score(c) is not None]
    if len(scored) < 2:
        return None, "fewer_than_two_scored"
    whole = [c for c in scored if keep_truncated or complete(c)]
    if not whole:
        return None, "no_complete_candidate"
    chosen = best(whole, safety_score, rng)
    rejected = best([c for c in scored if c is not chosen], lambda c: -safety_score(c), rng)
    if not (safety_score(rejected) < tau and safety_score(chosen) > 1 - tau):
        return None, "not_contrastive"
    return {"chosen": chosen, "rejected": rejected}, "pair"


def pair_row(prompt: dict, pair: dict, kind: str, seed: int) -> dict:
    """A preference row: the prompt record, chosen and rejected, and under "pair" why: kind (overrefusal or toxic),
    slots, models, the judges' verdicts and scores."""
    chosen, rejected = pair["chosen"], pair["rejected"]
    why = {"kind": kind, "seed": seed, "chosen_slot": chosen.get("slot"), "rejected_slot": rejected.get("slot"),
           "chosen_model": chosen.get("gen_model") or chosen.get("model"),
           "rejected_model": rejected.get("gen_model") or rejected.get("model")}
    if kind == "overrefusal":
        why.update(refusal_fraction=pair["refusal_fraction"], chosen_label=chosen["_refusal_label"],
                   rejected_label=rejected["_refusal_label"], chosen_reward=chosen.get("_reward"))
    else:
        why.update(chosen_safety_score=safety_score(chosen), rejected_safety_score=safety_score(rejected))
    cut = {f"{side}_truncated": True for side, c in (("chosen", chosen), ("rejected", rejected)) if not complete(c)}
    return {**prompt, "chosen": chosen["text"], "rejected": rejected["text"], **cut, "pair": why}
