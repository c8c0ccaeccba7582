"""Overgeneration: many completions per prompt, then SFT data and preference pairs chosen from them by judges.

    python overgen.py generate --input prompts.jsonl --output runs/teacher/general.jsonl --model gpt-4o
    python overgen.py generate --backend local --model runs/sft/final --input st.jsonl --output target.jsonl --n 1
    python overgen.py select --input runs/teacher/general.jsonl --output runs/sft/general.jsonl --strategy best \
        --safety_judge llamaguard --safety_model DIR --eval_files xstest.csv or-bench-hard-1k.csv
    python overgen.py overrefused --student target.jsonl --output overrefused.jsonl
    python overgen.py pairs --student target.jsonl --teacher candidates.jsonl --output pairs.jsonl --tau 0.01

`generate` samples --n completions per prompt from --model (a teacher, or the student being probed), one record
per (prompt, sample slot) written as soon as it finishes (porover/sampling.py): a rerun skips finished slots.
`select` keeps one candidate per prompt as SFT data (porover/selection.py); `overrefused` lists the prompts the
student refuses; `pairs` builds POROver's preference pairs (porover/pairs.py). These three decontaminate against
--eval_files, judge through porover/judging.py and porover/reward.py (answers cached next to the judged input) and
count every drop in <output stem>.summary.json.
"""
import asyncio
import dataclasses
import fcntl
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from porover import decontam, generation, judging, pairs, reward, sampling, selection
from porover.client import FatalAPIError, endpoint_host
from porover.config import parse, provenance
from porover.data import DataError
from porover.store import Store, write_json, write_jsonl

OPENAI_DEFAULTS = {"concurrency": 16, "timeout": 120.0, "max_attempts": 6, "backoff": 1.0, "backoff_max": 60.0}
LOCAL_DEFAULTS = {"batch_size": 8}


@dataclass
class GenerateConfig:
    """--n completions per prompt from an OpenAI-compatible endpoint or a local model."""
    input: str | None = None  # prompts JSONL, or benchmark specs (an OR-Bench/XSTest CSV, demo:train; porover.benchmarks)
    output: str = "runs/teacher/candidates.jsonl"
    backend: Literal["openai", "local"] = "openai"
    model: str | None = None  # the model sampled (default: gpt-4o served, smollm2-135m local)
    system_prompt: str | None = None  # sent to the model; never copied into the records (nor into SFT data)
    prefill: str | None = None  # local: the answer starts with this text (a stand-in teacher that cannot refuse)
    n: int = 8  # the paper's teacher settings: 8 completions at temperature 0.5, top_p 0.9
    temperature: float = 0.5
    top_p: float = 0.9
    max_new_tokens: int = 1024
    retry_failed: Literal["transient", "all", "none"] = "transient"  # which failed slots a rerun tries again
    dry_run: bool = False  # estimate tokens and cost, call nothing
    # openai backend (None: the defaults in OPENAI_DEFAULTS)
    base_url: str | None = None  # None: api.openai.com; or any OpenAI-compatible server
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name; the key itself is never a flag
    api_n: bool = True  # ask for n choices per request (verified; fans out with distinct seeds if fewer come)
    concurrency: int | None = None
    rpm: float | None = None
    tpm: float | None = None
    timeout: float | None = None  # seconds per attempt
    max_attempts: int | None = None
    backoff: float | None = None  # first backoff in seconds, doubled per attempt up to --backoff_max
    backoff_max: float | None = None  # also caps a server's Retry-After
    price_table: str | None = None
    # local backend
    batch_size: int | None = None
    chat_template: str | None = None


def resolve(cfg: GenerateConfig) -> GenerateConfig:
    """Defaults per backend; a flag the chosen backend would ignore is an error, never a silent no-op."""
    errors = [] if cfg.input else ["--input is required"]
    mine, other = (OPENAI_DEFAULTS, [*LOCAL_DEFAULTS, "chat_template"]) if cfg.backend == "openai" else \
        (LOCAL_DEFAULTS, [*OPENAI_DEFAULTS, "base_url", "rpm", "tpm", "price_table"])
    other += ["prefill"] if cfg.backend == "openai" else []
    errors += [f"--{k} does not apply to --backend {cfg.backend}" for k in other if getattr(cfg, k) is not None]
    for k in ("n", "max_new_tokens", "concurrency", "max_attempts", "batch_size"):
        if getattr(cfg, k) is not None and getattr(cfg, k) < 1:
            errors.append(f"--{k} must be at least 1")
    for k in ("rpm", "tpm", "timeout", "backoff", "backoff_max"):
        if getattr(cfg, k) is not None and not getattr(cfg, k) > 0:
            errors.append(f"--{k} must be positive" + (" (leave it out for no limit)" if k in ("rpm", "tpm") else ""))
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))
    model = cfg.model or ("gpt-4o" if cfg.backend == "openai" else "smollm2-135m")
    return dataclasses.replace(cfg, model=model, **{k: v for k, v in mine.items() if getattr(cfg, k) is None})


def sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + suffix)


def generate(cfg: GenerateConfig) -> dict:
    cfg = resolve(cfg)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(sibling(out, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS even on SIGKILL
        except BlockingIOError:
            raise RuntimeError(f"{out}: another generate run is writing it") from None
        prompts = sampling.read_prompts(cfg)
        # A local model enters the keys by its files: retrained in place, it gets new samples, not stale ones.
        host = f"local:{generation.identity(cfg.model, cfg.chat_template)}" if cfg.backend == "local" else \
            endpoint_host(cfg.base_url)
        done, errors = Store(out), Store(sibling(out, ".errors.jsonl"))
        jobs, counts = sampling.plan(prompts, host, cfg, done, errors)
        print(f"{counts['prompts']} prompts x {cfg.n} = {counts['slots']} slots: {counts['finished_before']} "
              f"finished before, {counts['todo']} to do, {counts['torn_lines_truncated']} torn line(s) truncated",
              file=sys.stderr)
        summary, sink = {"config": dataclasses.asdict(cfg), "fatal": None}, None
        try:
            if cfg.dry_run:
                summary["dry_run"] = sampling.dry_run(cfg, jobs)
                print(json.dumps(summary["dry_run"]), file=sys.stderr)
            else:
                out.touch()  # no prompt left to do is still an output: zero records, not a missing file
            if jobs and not cfg.dry_run:
                sink = sampling.Sink(cfg, done, errors, counts["todo"])
                if cfg.backend == "local":
                    sampling.run_local(cfg, jobs, sink)
                else:
                    asyncio.run(sampling.run_openai(cfg, jobs, sink))
        except FatalAPIError as e:
            summary["fatal"] = str(e)
            raise
        finally:  # also after a fatal error or Ctrl-C: what was done is accounted for
            done.close()
            errors.close()
            sampling.write_summary(cfg, sibling(out, ".summary.json"), summary, counts, sink)
    return summary


# ---------------------------------------------------------------------------------------------------------
# select, overrefused and pairs: judged choices from generate's records

@dataclass
class ChooseConfig(judging.JudgeConfig, reward.RewardConfig):
    """What select, overrefused and pairs share: judges, reward model, decontamination, the seed of random choices."""
    seed: int = 0
    eval_files: tuple[str, ...] = ()  # --eval_files a.jsonl b.csv ... (repeatable): decontaminate against these
    ngram: int = decontam.NGRAM
    near_threshold: float = decontam.THRESHOLD
    judge_cache: str | None = None  # default: <first input's stem>.judge_cache.jsonl (shared by overrefused, pairs)


def resolved(cfg, required: tuple[str, ...], judged: bool, extra: list[str] = ()):
    """eval_files as a tuple; every flag checked (a flag the run would ignore is an error, never a no-op)."""
    cfg = dataclasses.replace(cfg, eval_files=(cfg.eval_files,) if isinstance(cfg.eval_files, str) else
                              tuple(cfg.eval_files))
    e = [f"--{k} is required" for k in required if not getattr(cfg, k)] + list(extra)
    if judged:
        e += judging.config_errors(cfg) + reward.reward_errors(cfg)
    else:
        flags = [f.name for f in dataclasses.fields(ChooseConfig)
                 if f.name not in ("seed", "eval_files", "ngram", "near_threshold")]
        e += [f"--{k} does not apply to --strategy random" for k in flags if getattr(cfg, k) != getattr(type(cfg), k)]
    e += [f"--{k} applies only with --eval_files" for k in ("ngram", "near_threshold")
          if not cfg.eval_files and getattr(cfg, k) != getattr(ChooseConfig, k)]
    if cfg.ngram < decontam.MIN_WORDS or not 0 < cfg.near_threshold <= 1:
        e.append(f"--ngram must be at least {decontam.MIN_WORDS} and --near_threshold in (0, 1]")
    if e:
        raise ValueError("invalid config: " + "; ".join(e))
    return cfg


def judge_cache(cfg: ChooseConfig, first_input: str, counts: Counter) -> Store:
    cache = Store(cfg.judge_cache or sibling(Path(first_input), ".judge_cache.jsonl"))
    counts["cache_torn_lines_truncated"] = cache.torn
    return cache


def finish(cfg: ChooseConfig, out: Path, rows: list[dict], summary: dict, inputs: dict, title: str, note: str):
    """The output in one atomic write, then its summary (counts, judges, decontamination, provenance), then the
    counts on stderr, one line per stage in pipeline order (a count's stage is its first word)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)
    summary.update(config=dataclasses.asdict(cfg), refusal="full_refusal or partial_refusal"
                   if cfg.partial_is_refusal else "full_refusal only")
    summary["decontamination"] = {"ngram": cfg.ngram, "threshold": cfg.near_threshold,
                                  "min_words": decontam.MIN_WORDS, "dropped": summary.pop("contaminated")}
    summary.update(provenance({**inputs, **{f"eval_file_{i}": p for i, p in enumerate(cfg.eval_files)}},
                              world_size=1, seed=cfg.seed, device=judging.device(cfg)))
    write_json(sibling(out, ".summary.json"), summary)
    stages = {}
    for k, v in summary["counts"].items():
        stages.setdefault(k.split("_")[0], []).append(f"{k.split('_', 1)[1]}={v}")
    print(f"{title} -> {out}\n" + "".join(f"  {s}: {', '.join(v)}\n" for s, v in stages.items())
          + f"  judges: {summary['judges']}; refusal = {summary['refusal']}\n  {note}", file=sys.stderr)
    return summary


@dataclass
class SelectConfig(ChooseConfig):
    """One candidate per prompt as SFT data (the paper's selection): generate's candidates in, SFT JSONL out, in id
    order. random: a seeded uniform choice among the candidates that pass the filters. best: general (and seemingly
    toxic) prompts -> the highest --reward_model score (without one: the seeded random choice, labelled so); toxic
    prompts -> the highest safety score (--safety_judge llamaguard: 1 - p_unsafe; proxy: a refusal). Ties: seeded."""
    input: str | None = None  # teacher candidates (generate's output)
    output: str | None = None  # SFT JSONL; <stem>.summary.json goes next to it
    strategy: Literal["random", "best"] = "best"
    keep_truncated: bool = False  # keep finish_reason=length candidates, written with "truncated": true


def select(cfg: SelectConfig) -> dict:
    best = cfg.strategy == "best"
    extra = [f"--{k} applies only with --safety_judge proxy (whose safety score is the refusal verdict)"
             for k in ("judge", "judge_model", "judge_template", "judge_max_tokens", "judge_base_url")
             if cfg.safety_judge != "proxy" and getattr(cfg, k) != getattr(SelectConfig, k)]
    cfg = resolved(cfg, ("input", "output"), best, extra)
    groups = selection.read_candidates(cfg.input)
    if best:
        selection.check_types(cfg.input, groups)
    counts = Counter({"read_prompts": len(groups), "read_candidates": sum(len(g["cands"]) for g in groups.values())}
                     | {f"dropped_{r}": 0 for r in selection.DROP_REASONS})
    contaminated = selection.decontaminate(groups, cfg.eval_files, cfg.ngram, cfg.near_threshold, counts)
    for g in groups.values():
        g["kept"] = selection.keep(g["cands"], cfg.keep_truncated, counts)
        counts["kept_truncated"] += sum(c.get("finish_reason") == "length" for c in g["kept"])
        counts["prompts_no_candidate_left"] += not g["kept"]
    toxic = [c for g in groups.values() for c in g["kept"] if c["_type"] == "toxic"]
    judge_ids = "none (random)"
    if best:
        if toxic and cfg.safety_judge == "none":
            raise ValueError("invalid config: toxic prompts are chosen by their safety score: --strategy best needs "
                             "--safety_judge proxy or llamaguard")
        with judge_cache(cfg, cfg.input, counts) as cache:
            judge_ids = judging.run(cfg, cache, counts, [], toxic)
            if cfg.reward_model:
                judge_ids["reward"] = reward.score(cfg, [c for g in groups.values() for c in g["kept"]
                                                         if c["_type"] != "toxic"], cache, counts)
    rows = [row for pid, g in sorted(groups.items()) if (row := select_one(cfg, pid, g, counts))]
    counts["selected_total"] = len(rows)
    truncation = ("kept, marked truncated: true: no end-of-turn token may be trained after the cut"
                  if cfg.keep_truncated else "finish_reason=length dropped")
    return finish(cfg, Path(cfg.output), rows, {"counts": dict(counts), "judges": judge_ids, "truncation": truncation,
                                                "contaminated": contaminated}, {"input": cfg.input},
                  f"select ({cfg.strategy})", f"truncation: {truncation}")


def select_one(cfg: SelectConfig, pid: str, g: dict, counts: Counter) -> dict | None:
    """The SFT row of one prompt (its record, the chosen response, and why under "selection"), or None."""
    choice, how = selection.choose(g["kept"], cfg.strategy, bool(cfg.reward_model), random.Random(f"{cfg.seed}:{pid}"))
    if choice is None:
        counts[f"prompts_{how}"] += bool(g["kept"])
        return None
    cut = choice.get("finish_reason") == "length"
    counts.update([f"selected_{choice['_type'] or 'untyped'}", f"selected_by_{how.split()[0]}"]
                  + ["selected_truncated"] * cut)
    why = {"strategy": cfg.strategy, "by": how, "seed": cfg.seed, "slot": choice.get("slot"), "key": choice.get("key"),
           "gen_model": choice.get("gen_model") or choice.get("model"), "candidates": len(g["kept"]),
           "safety_score": judging.safety_score(choice) if "_p_unsafe" in choice else None,
           "reward": choice.get("_reward")}
    return {**g["prompt"], "response": choice["text"], **({"truncated": True} if cut else {}), "selection": why}


@dataclass
class OverrefusedConfig(ChooseConfig):
    """The seemingly toxic prompts the target model overrefuses, as a prompts file for the teacher's generate (the
    paper asks the teacher only about these). The student's answers: generate --backend local --model SFT_MODEL
    --n 1 --temperature 0.1 --top_p 0.95 on the seemingly toxic prompts."""
    student: str | None = None  # the target model's answers (generate's output); slots 0..k_student-1 are read
    output: str | None = None  # the overrefused prompts (JSONL prompt records, in id order)
    k_student: int = 1  # K: the target model's answers per prompt (the paper: 1)
    tau_refusal: float = 0.5  # overrefused when at least this share of the K answers are refusals (K = 1: a refusal)


def overrefusal(cfg: OverrefusedConfig, counts: Counter) -> tuple[dict, list, dict]:
    """The student's seemingly toxic prompts (after decontamination), judged: ({id: group}, [(id, refusals)] of the
    overrefused ones, the judges' ids)."""
    student = selection.read_candidates(cfg.student)
    selection.check_types(cfg.student, student)
    counts.update(read_prompts=len(student), read_student_answers=sum(len(g["cands"]) for g in student.values()))
    for pid, g in list(student.items()):
        slots = [c.get("slot") for c in g["cands"]]
        if not all(isinstance(x, int) for x in slots) or len(set(slots)) < len(slots):
            raise DataError(f"{cfg.student}:{g['line']}: field 'slot': id {pid!r} needs one integer slot per answer, "
                            f"got {slots} (two generate runs with other settings written into one file?)")
        if g["cands"][0]["_type"] != "seemingly_toxic":
            counts[f"student_skipped_{g['cands'][0]['_type']}"] += 1
            del student[pid]
    contaminated = selection.decontaminate(student, cfg.eval_files, cfg.ngram, cfg.near_threshold, counts)
    answers = [c for g in student.values() for c in g["cands"] if c["slot"] < cfg.k_student and pairs.usable(c)]
    with judge_cache(cfg, cfg.student, counts) as cache:
        ids = judging.run(cfg, cache, counts, answers)
    over = []
    for pid, g in sorted(student.items()):
        refusals, why = pairs.student_refusals(g["cands"], cfg.k_student)
        overrefused = refusals is not None and bool(refusals) and len(refusals) / cfg.k_student >= cfg.tau_refusal
        counts["student_" + ("overrefused" if overrefused else why if refusals is None else "not_overrefused")] += 1
        if overrefused:
            over.append((pid, refusals))
    return student, over, {"judges": ids, "contaminated": contaminated}


def overrefusal_errors(cfg: OverrefusedConfig) -> list[str]:
    e = ["--k_student must be at least 1"] if cfg.k_student < 1 else []
    return e + (["--tau_refusal must be in (0, 1]"] if not 0 < cfg.tau_refusal <= 1 else [])


def overrefused(cfg: OverrefusedConfig) -> dict:
    cfg = resolved(cfg, ("student", "output"), True, overrefusal_errors(cfg))
    counts = Counter()
    student, over, info = overrefusal(cfg, counts)
    rows = [student[pid]["prompt"] for pid, _ in over]
    return finish(cfg, Path(cfg.output), rows, {"counts": dict(counts), **info}, {"student": cfg.student},
                  "overrefused", f"overrefused: at least {cfg.tau_refusal} of {cfg.k_student} answer(s) refusals")


@dataclass
class PairsConfig(OverrefusedConfig):
    """POROver's preference pairs (porover/pairs.py), in id order, each with why under "pair". Overrefusal pairs:
    the student's refusal of an overrefused seemingly toxic prompt against the teacher's best compliant candidate
    (--reward_model; else a seeded random one). Toxic pairs: the safest against the least safe of the teacher's
    candidates for a toxic prompt, when contrastive under --tau (needs --safety_judge proxy or llamaguard)."""
    teacher: str | None = None  # the teacher's candidates (generate's output) on overrefused and toxic prompts
    output: str | None = None  # preference JSONL for train_pref.py; <stem>.summary.json goes next to it
    tau: float = 0.01  # the containment threshold: some s < tau and another s > 1 - tau (the paper's 0.01)
    keep_truncated: bool = False  # a chosen text may be cut at the length limit (marked; trained without a stop)


def build_pairs(cfg: PairsConfig) -> dict:
    errors = overrefusal_errors(cfg) + ([] if 0 <= cfg.tau <= 0.5 else ["--tau must be in [0, 0.5]"])
    cfg = resolved(cfg, ("student", "teacher", "output"), True, errors)
    counts = Counter()
    student, over, info = overrefusal(cfg, counts)
    teacher = selection.read_candidates(cfg.teacher)
    counts.update(read_teacher_prompts=len(teacher), read_teacher_candidates=sum(len(g["cands"]) for g in
                                                                                  teacher.values()))
    for pid, g in teacher.items():
        if student.get(pid) and student[pid]["messages"] != g["messages"]:
            raise DataError(f"{cfg.teacher}:{g['line']}: field 'prompt': id {pid!r} has another prompt in {cfg.student}")
    toxic = {pid: g for pid, g in teacher.items() if g["cands"][0]["_type"] == "toxic"}
    info["contaminated"] += selection.decontaminate(toxic, cfg.eval_files, cfg.ngram, cfg.near_threshold, counts)
    if toxic and cfg.safety_judge == "none":
        counts["toxic_skipped_no_safety_judge"], toxic = len(toxic), {}
    todo = [(pid, student[pid], teacher.get(pid)) for pid, _ in over]
    counts["overrefusal_no_teacher_candidates"] = sum(t is None for *_, t in todo)
    todo = [x for x in todo if x[2] is not None]
    for *_, t in todo:
        t["kept"] = selection.keep(t["cands"], cfg.keep_truncated, counts, prefix="teacher_dropped")
    rows = judge_and_pair(cfg, todo, toxic, counts, info)
    counts["pairs_total"] = len(rows)
    how = "the best by the reward model" if cfg.reward_model else "a seeded random choice (no --reward_model)"
    return finish(cfg, Path(cfg.output), rows, {"counts": dict(counts), **info, "chosen": how},
                  {"student": cfg.student, "teacher": cfg.teacher}, "pairs", f"overrefusal pairs' chosen: {how}")


def judge_and_pair(cfg: PairsConfig, todo: list, toxic: dict, counts: Counter, info: dict) -> list[dict]:
    """The teacher's candidates judged (refusal on overrefused prompts, safety on toxic ones, reward on the
    compliant ones), then one pair per prompt where the rules allow, in id order."""
    seemingly = [c for *_, t in todo for c in t["kept"]]
    cands = {pid: selection.keep(g["cands"], True, counts, prefix="toxic_dropped") for pid, g in toxic.items()}
    with judge_cache(cfg, cfg.student, counts) as cache:
        judged = Counter()
        info["judges"] = judging.run(cfg, cache, judged, seemingly, [c for cs in cands.values() for c in cs])
        if cfg.reward_model:
            info["judges"]["reward"] = reward.score(cfg, [c for c in seemingly if c["_refusal"] is False], cache,
                                                    judged)
        counts.update({f"teacher_{k}": v for k, v in judged.items()})
    rows = []
    for pid, s, t in todo:
        pair, why = pairs.overrefusal_pair(s["cands"], t["kept"], cfg.k_student, cfg.tau_refusal,
                                           bool(cfg.reward_model), random.Random(f"{cfg.seed}:{pid}"),
                                           cfg.keep_truncated)
        counts[f"overrefusal_{why}"] += 1
        rows += [(pid, pairs.pair_row(s["prompt"], pair, "overrefusal", cfg.seed))] if pair else []
    for pid, cs in cands.items():
        pair, why = pairs.toxic_pair(cs, cfg.tau, random.Random(f"{cfg.seed}:{pid}"), cfg.keep_truncated)
        counts[f"toxic_{why}"] += 1
        rows += [(pid, pairs.pair_row(toxic[pid]["prompt"], pair, "toxic", cfg.seed))] if pair else []
    counts.update(pairs_overrefusal=counts["overrefusal_pair"], pairs_toxic=counts["toxic_pair"])
    return [r for _, r in sorted(rows, key=lambda x: x[0])]


COMMANDS = {"generate": (GenerateConfig, generate), "select": (SelectConfig, select),
            "overrefused": (OverrefusedConfig, overrefused), "pairs": (PairsConfig, build_pairs)}


def main(cfg):
    return next(fn for cls, fn in COMMANDS.values() if type(cfg) is cls)(cfg)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python overgen.py {{{'|'.join(COMMANDS)}}} [--flags]")
    try:
        main(parse(COMMANDS[sys.argv[1]][0], sys.argv[2:]))
    except FatalAPIError as e:
        sys.exit(f"overgen: stopped: {e}")
