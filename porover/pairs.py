"""POROver's preference pairs (the paper's "Algorithm 1", as reconstructed: README "Deviations and
reconstructions") from judged candidates: pure functions, so every threshold is tested on hand-made inputs.

For a seemingly toxic prompt x with the student's first K samples y_1..y_K (sampled, temperature > 0):

    r(x) = |{k : judge(y_k) = refusal}| / K          x is overrefused when r(x) >= tau_refusal (reading A of tau)
    chosen   = a teacher completion judged compliant and not unsafe, with safety_score = 1 - p_unsafe >= tau_safe
               (reading B); without a safety judge this filter is skipped and counted, never faked
    rejected = one of the student's refusals of x (on-policy)

Safety anchors on toxic prompts keep the student refusing what it should: chosen = a safe teacher completion
(safety_score >= tau_safe; without a safety judge, a teacher refusal), rejected = an unsafe student sample
(without a safety judge, one that complied: the proxy, counted as such).

A candidate here is a dict from porover.selection.read_candidates after porover.judging ran (lists in slot
order, so seeded choices do not depend on the order a file was written in): "text", "slot", "status",
"finish_reason", and "_refusal" (bool, None when unjudged), "_p_unsafe" and "_unsafe" (None without a verdict).
Each function returns (pair or None, outcome): the outcome names the first filter a prompt failed, for the counts.
"""
import math
import random


def usable(c: dict) -> bool:
    """A sample the judges can read. Duplicates stay: a student that refuses the same way twice refused twice."""
    return c["status"] == "ok" and bool(c["text"].strip())


def safety_score(c: dict) -> float | None:
    return None if c["_p_unsafe"] is None else 1.0 - c["_p_unsafe"]


def safe_enough(c: dict, tau_safe: float) -> bool:
    """Judged not unsafe, with safety_score >= tau_safe (a verdict without a score is not enough: never guessed)."""
    return c["_unsafe"] is False and (s := safety_score(c)) is not None and s >= tau_safe


def complete(c: dict) -> bool:
    """Not cut at max tokens: a cut text would be trained with an end-of-turn token after the cut."""
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


def overrefusal_pair(student: list[dict], teacher: list[dict], k: int, tau_refusal: float, tau_safe: float,
                     safety_judge: bool, rng: random.Random) -> tuple[dict | None, str]:
    """The pair for one seemingly toxic prompt: (teacher's compliant answer, student's refusal)."""
    refusals, why = student_refusals(student, k)
    if refusals is None:
        return None, why
    fraction = len(refusals) / k
    if fraction < tau_refusal:
        return None, "not_overrefused"
    refusals = [c for c in refusals if complete(c)]
    if not refusals:
        return None, "student_refusals_truncated"
    answers = [c for c in teacher if usable(c) and complete(c) and c["_refusal"] is False]
    if not answers:
        return None, "no_compliant_teacher_answer"
    if safety_judge:
        answers = [c for c in answers if safe_enough(c, tau_safe)]
        if not answers:
            return None, "no_teacher_answer_safe_enough"
    chosen, rejected = rng.choice(answers), rng.choice(refusals)
    return {"chosen": chosen, "rejected": rejected, "refusal_fraction": fraction}, "pair"


def anchor_pair(student: list[dict], teacher: list[dict], tau_safe: float, safety_judge: bool,
                rng: random.Random) -> tuple[dict | None, str]:
    """The safety anchor for one toxic prompt: (teacher's safe answer, student's unsafe sample)."""
    if safety_judge:
        safe = [c for c in teacher if usable(c) and complete(c) and safe_enough(c, tau_safe)]
        unsafe = [c for c in student if usable(c) and complete(c) and c["_unsafe"] is True]
    else:  # the proxy: on a toxic prompt a refusal is the safe answer and compliance the unsafe one
        safe = [c for c in teacher if usable(c) and complete(c) and c["_refusal"] is True]
        unsafe = [c for c in student if usable(c) and complete(c) and c["_refusal"] is False]
    if not safe:
        return None, "no_safe_teacher_answer"
    if not unsafe:
        return None, "no_unsafe_student_sample"
    return {"chosen": rng.choice(safe), "rejected": rng.choice(unsafe)}, "available"


def pair_row(prompt: dict, pair: dict, kind: str, seed: int, k_student: int, tau_refusal: float) -> dict:
    """A preference row: the prompt record, chosen and rejected, and under "pair" why: kind (overrefusal or
    anchor), slots, models, judges' verdicts."""
    chosen, rejected = pair["chosen"], pair["rejected"]
    why = {"kind": kind, "seed": seed, "chosen_slot": chosen.get("slot"), "rejected_slot": rejected.get("slot"),
           "teacher_model": chosen.get("gen_model") or chosen.get("model"),
           "student_model": rejected.get("gen_model") or rejected.get("model"),
           # An anchor is chosen by the safety judge: its refusal judgement may have failed (null).
           "chosen_label": chosen["_refusal_label"], "rejected_label": rejected["_refusal_label"],
           "chosen_p_unsafe": chosen["_p_unsafe"], "rejected_p_unsafe": rejected["_p_unsafe"]}
    if kind == "overrefusal":
        why.update(refusal_fraction=pair["refusal_fraction"], k_student=k_student, tau_refusal=tau_refusal)
    return {**prompt, "chosen": chosen["text"], "rejected": rejected["text"], "pair": why}


def anchors_wanted(n_pairs: int, anchor_ratio: float) -> int:
    return math.floor(anchor_ratio * n_pairs + 0.5)  # halves round up (round() would go to the even number)


def take_anchors(available: list, n_pairs: int, anchor_ratio: float, seed: int) -> list:
    """anchors_wanted of the available (prompt id, pair) anchors, a seeded choice (all when fewer), in id order.
    Sorted first, so the choice depends on the ids alone, not on the order the files were written in."""
    available = sorted(available, key=lambda a: a[0])
    want = min(anchors_wanted(n_pairs, anchor_ratio), len(available))
    picked = random.Random(f"{seed}:anchors").sample(available, want)
    return sorted(picked, key=lambda a: a[0])
