"""Overgeneration: many completions per prompt, then SFT data and preference pairs chosen from them by judges.

    python overgen.py generate --input prompts.jsonl --output runs/teacher/general.jsonl --model gpt-4o --n 4
    python overgen.py generate --backend local --input prompts.jsonl --output runs/teacher/local.jsonl --n 2
    python overgen.py select --input runs/teacher/general.jsonl --output runs/sft/general.jsonl --strategy best \
        --safety_judge llamaguard --safety_model DIR --eval_files xstest.csv or-bench-hard-1k.csv
    python overgen.py pairs --student runs/pairs/student.jsonl --teacher runs/teacher/st.jsonl \
        --output runs/pairs/pairs.jsonl --k_student 4 --tau_refusal 0.5

`generate` samples --n completions per prompt from --model (a teacher, or the student being probed) and writes
one record per (prompt, sample slot) to --output as soon as its request finishes (porover/sampling.py). A rerun
skips finished slots, so a killed run resumes without paying twice, and raising --n from 4 to 8 reuses slots 0-3.
Failures go to <output stem>.errors.jsonl; counts, tokens, cost and provenance to <output stem>.summary.json.

`select` keeps one candidate per prompt as SFT data (porover/selection.py); `pairs` builds POROver's preference
pairs (porover/pairs.py). Both decontaminate against --eval_files, judge with porover/judging.py (answers cached
in <output stem>.judge_cache.jsonl: a rerun never asks a judge twice) and count every drop in the summary.
"""
import argparse
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

from porover import decontam, generation, judging, pairs, sampling, selection
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
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
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
            elif jobs:
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
# select and pairs: judged choices from generate's records

@dataclass
class ChooseConfig(judging.JudgeConfig):
    """What select and pairs share: judges, decontamination, the seed of every random choice."""
    seed: int = 0
    eval_files: tuple[str, ...] = ()  # --eval_files a.jsonl b.csv ... (repeatable): decontaminate against these
    ngram: int = decontam.NGRAM
    near_threshold: float = decontam.THRESHOLD
    judge_cache: str | None = None  # default: <output stem>.judge_cache.jsonl


def choose_errors(cfg: ChooseConfig, required: tuple[str, ...], judged: bool) -> list[str]:
    e = [f"--{k} is required" for k in required if not getattr(cfg, k)]
    if not judged:
        judge_flags = [f.name for f in dataclasses.fields(judging.JudgeConfig)] + ["reward_model"]
        e += [f"--{k} does not apply to --strategy random" for k in judge_flags
              if getattr(cfg, k, None) != getattr(type(cfg), k, None)]
    else:
        e += judging.config_errors(cfg)
    e += [f"--{k} applies only with --eval_files" for k in ("ngram", "near_threshold")
          if not cfg.eval_files and getattr(cfg, k) != getattr(ChooseConfig, k)]
    if cfg.ngram < decontam.MIN_WORDS or not 0 < cfg.near_threshold <= 1:
        e.append(f"--ngram must be at least {decontam.MIN_WORDS} and --near_threshold in (0, 1]")
    return e


def resolved(cfg, required: tuple[str, ...], judged: bool, extra: list[str] = ()):
    cfg = dataclasses.replace(cfg, eval_files=(cfg.eval_files,) if isinstance(cfg.eval_files, str) else
                              tuple(cfg.eval_files))
    if e := choose_errors(cfg, required, judged) + list(extra):
        raise ValueError("invalid config: " + "; ".join(e))
    return cfg


def judge_cache(cfg: ChooseConfig, out: Path, counts: Counter) -> Store:
    cache = Store(cfg.judge_cache or sibling(out, ".judge_cache.jsonl"))
    counts["cache_torn_lines_truncated"] = cache.torn
    return cache


def finish(cfg: ChooseConfig, out: Path, rows: list[dict], summary: dict, inputs: dict, title: str, note: str):
    """The output in one atomic write, then its summary (counts, judges, decontamination, provenance), then the
    counts on stderr, one line per stage in pipeline order (a count's stage is its first word)."""
    write_jsonl(out, rows)
    summary.update(config=dataclasses.asdict(cfg), refusal="full_refusal or partial_refusal"
                   if cfg.partial_is_refusal else "full_refusal only")
    summary["decontamination"] = {"ngram": cfg.ngram, "threshold": cfg.near_threshold,
                                  "min_words": decontam.MIN_WORDS, "dropped": summary.pop("contaminated")}
    summary.update(provenance({**inputs, **{f"eval_file_{i}": p for i, p in enumerate(cfg.eval_files)}},
                              world_size=1, seed=cfg.seed, device=judging.device(cfg, getattr(cfg, "reward_model", None))))
    write_json(sibling(out, ".summary.json"), summary)
    stages = {}
    for k, v in summary["counts"].items():
        stages.setdefault(k.split("_")[0], []).append(f"{k.split('_', 1)[1]}={v}")
    print(f"{title} -> {out}\n" + "".join(f"  {s}: {', '.join(v)}\n" for s, v in stages.items())
          + f"  judges: {summary['judges']}; refusal = {summary['refusal']}\n  {note}", file=sys.stderr)
    return summary


@dataclass
class SelectConfig(ChooseConfig):
    """One candidate per prompt: generate's candidates in, SFT JSONL out (in id order).

    random: a seeded uniform choice among the candidates that pass the filters. best, per prompt type: general
    and seemingly_toxic -> not a refusal and not unsafe, then the highest reward; toxic -> not unsafe with the
    lowest p_unsafe under Llama Guard, or (no safety judge) a refusal. Remaining ties: a seeded random choice."""
    input: str | None = None  # teacher candidates (generate's output)
    output: str | None = None  # SFT JSONL; <stem>.summary.json and <stem>.judge_cache.jsonl go next to it
    strategy: Literal["random", "best"] = "best"
    reward_model: str | None = None  # a transformers sequence-classification model; reward = its last logit
    keep_truncated: bool = False  # keep finish_reason=length candidates, written with "truncated": true


def select(cfg: SelectConfig) -> dict:
    best = cfg.strategy == "best"
    cfg = resolved(cfg, ("input", "output"), best)
    out = Path(cfg.output)
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
    pool, judge_ids = [c for g in groups.values() for c in g["kept"]], "none (random)"
    if best:
        cache = judge_cache(cfg, out, counts)
        judge_ids = judging.run(cfg, pool, cache, counts)
        if cfg.reward_model:
            judge_ids["reward"] = judging.reward(cfg.reward_model, pool, cache, counts)
        cache.close()
    rows = [row for pid, g in sorted(groups.items()) if (row := select_one(cfg, pid, g, counts))]
    counts["selected_total"] = len(rows)
    truncation = ("kept, marked truncated: true: no end-of-turn token may be trained after the cut"
                  if cfg.keep_truncated else "finish_reason=length dropped")
    return finish(cfg, out, rows, {"counts": dict(counts), "judges": judge_ids, "truncation": truncation,
                                   "contaminated": contaminated}, {"input": cfg.input},
                  f"select ({cfg.strategy})", f"truncation: {truncation}")


def select_one(cfg: SelectConfig, pid: str, g: dict, counts: Counter) -> dict | None:
    """The SFT row of one prompt (its record, the chosen response, and why under "selection"), or None."""
    eligible = None
    if cfg.strategy == "best":
        reasons = [selection.ineligible(c, cfg.safety_judge == "llamaguard", counts) for c in g["kept"]]
        counts.update(f"ineligible_{r}" for r in reasons if r)
        eligible = [c for c, r in zip(g["kept"], reasons) if r is None]
        counts["prompts_no_eligible"] += bool(g["kept"]) and not eligible
    choice = selection.choose(g["kept"], eligible, cfg.seed, pid)
    if choice is None:
        return None
    cut = choice.get("finish_reason") == "length"
    counts.update([f"selected_{choice['_type'] or 'untyped'}"] + ["selected_truncated"] * cut)
    why = {"strategy": cfg.strategy, "seed": cfg.seed, "slot": choice.get("slot"), "key": choice.get("key"),
           "gen_model": choice.get("gen_model") or choice.get("model"), "candidates": len(g["kept"])}
    if eligible is not None:
        why.update(eligible=len(eligible), refusal_label=choice["_refusal_label"], unsafe=choice["_unsafe"],
                   p_unsafe=choice["_p_unsafe"], reward=choice.get("_reward"))
    return {**g["prompt"], "response": choice["text"], **({"truncated": True} if cut else {}), "selection": why}


@dataclass
class PairsConfig(ChooseConfig):
    """Preference pairs: the student's own refusals of seemingly toxic prompts against the teacher's compliant
    answers, plus optional safety anchors on toxic prompts; the rule is in porover/pairs.py. Both inputs are
    generate's output on the same prompts, typed seemingly_toxic or toxic (general is skipped):
        student: generate --backend local --model runs/sft/final --n 4 --temperature 1.0
        teacher: generate --model gpt-4o --n 4
    Out: preference JSONL for train_pref.py, in id order, each pair with why it was built under "pair"."""
    student: str | None = None  # the student's samples (generate's output); slots 0..k_student-1 are read
    teacher: str | None = None  # the teacher's candidates (generate's output)
    output: str | None = None  # preference JSONL; <stem>.summary.json and <stem>.judge_cache.jsonl go next to it
    k_student: int = 4  # K: student samples per prompt for the refusal fraction
    tau_refusal: float = 0.5  # overrefused when at least this share of the K samples are refusals
    tau_safe: float = 0.5  # chosen needs safety_score = 1 - p_unsafe >= tau_safe (needs --safety_judge llamaguard)
    anchor_ratio: float = 0.0  # safety-anchor pairs on toxic prompts per overrefusal pair


def pair_errors(cfg: PairsConfig) -> list[str]:
    e = ["--safety_judge proxy scores refusals, which the pairs contrast: use none or llamaguard"] \
        if cfg.safety_judge == "proxy" else []
    if cfg.tau_safe != PairsConfig.tau_safe and cfg.safety_judge != "llamaguard":
        e.append("--tau_safe needs --safety_judge llamaguard")
    if cfg.k_student < 1:
        e.append("--k_student must be at least 1")
    if not 0 < cfg.tau_refusal <= 1 or not 0 <= cfg.tau_safe <= 1 or cfg.anchor_ratio < 0:
        e.append("--tau_refusal must be in (0, 1], --tau_safe in [0, 1] and --anchor_ratio at least 0")
    return e


def read_pair_inputs(cfg: PairsConfig, counts: Counter) -> list[tuple]:
    """(id, kind, student group, teacher group) per prompt a pair may come from, after the type rules and
    decontamination; the teacher's candidates go through select's drop filters (the student's are all read)."""
    student, teacher = selection.read_candidates(cfg.student), selection.read_candidates(cfg.teacher)
    counts.update({"read_prompts": len(student),
                   "read_student_samples": sum(len(g["cands"]) for g in student.values()),
                   "read_teacher_candidates": sum(len(g["cands"]) for g in teacher.values()),
                   "read_teacher_prompts_without_student_samples": len(teacher.keys() - student.keys())})
    selection.check_types(cfg.student, student)
    todo = []
    for pid, g in student.items():
        kind, t, slots = g["cands"][0]["_type"], teacher.get(pid), [c.get("slot") for c in g["cands"]]
        if not all(isinstance(x, int) for x in slots) or len(set(slots)) < len(slots):
            raise DataError(f"{cfg.student}:{g['line']}: field 'slot': id {pid!r} needs one integer slot per sample, "
                            f"got {slots} (two generate runs with other settings written into one file?)")
        if t is not None and t["messages"] != g["messages"]:
            raise DataError(f"{cfg.teacher}:{t['line']}: field 'prompt': id {pid!r} has another prompt on "
                            f"{cfg.student}:{g['line']}")
        if kind == "general" or kind == "toxic" and not cfg.anchor_ratio:
            counts[f"skipped_{kind}" + ("_no_anchor_ratio" if kind == "toxic" else "")] += 1
        elif t is None:
            counts["skipped_no_teacher_candidates"] += 1
        else:
            todo.append((pid, kind, g, t))
    kept = {pid: g for pid, _, g, _ in todo}
    contaminated = selection.decontaminate(kept, cfg.eval_files, cfg.ngram, cfg.near_threshold, counts)
    todo = [x for x in todo if x[0] in kept]
    for *_, t in todo:
        t["kept"] = selection.keep(t["cands"], False, counts, prefix="teacher_dropped")
    return todo, contaminated


def judge_pairs(cfg: PairsConfig, todo: list, cache: Store, counts: Counter) -> dict:
    """The student's samples on seemingly toxic prompts get the refusal judge (only slots < K); on toxic prompts, and
    the teacher's candidates everywhere, the refusal and the safety judge."""
    refusal_only = dataclasses.replace(cfg, safety_judge="none", safety_model=None, safety_base_url=None)
    for role, judge_cfg, cands in (
            ("student", refusal_only, [c for _, k, g, _ in todo if k != "toxic" for c in g["cands"]
                                       if c["slot"] < cfg.k_student and pairs.usable(c)]),
            ("student", cfg, [c for _, k, g, _ in todo if k == "toxic" for c in g["cands"] if pairs.usable(c)]),
            ("teacher", cfg, [c for *_, t in todo for c in t["kept"]])):
        judged = Counter()
        judging.run(judge_cfg, cands, cache, judged)
        counts.update({f"{role}_{k}": v for k, v in judged.items()})
    return judging.judge_ids(cfg)


def build_pairs(cfg: PairsConfig) -> dict:
    cfg = resolved(cfg, ("student", "teacher", "output"), True, pair_errors(cfg))
    out = Path(cfg.output)
    counts = Counter()
    todo, contaminated = read_pair_inputs(cfg, counts)
    cache = judge_cache(cfg, out, counts)
    ids = judge_pairs(cfg, todo, cache, counts)
    cache.close()
    rows, anchors, safety = [], [], cfg.safety_judge == "llamaguard"
    for pid, kind, g, t in todo:
        rng = random.Random(f"{cfg.seed}:{pid}")  # per prompt: adding or removing prompts changes no other pair
        if kind == "seemingly_toxic":
            pair, why = pairs.overrefusal_pair(g["cands"], t["kept"], cfg.k_student, cfg.tau_refusal, cfg.tau_safe,
                                               safety, rng)
        else:
            pair, why = pairs.anchor_pair(g["cands"], t["kept"], cfg.tau_safe, safety, rng)
        if pair and pair["chosen"]["text"].strip() == pair["rejected"]["text"].strip():
            pair, why = None, "chosen_equals_rejected"  # the judges disagreed with themselves: teaches nothing
        stage = "overrefusal" if kind == "seemingly_toxic" else "anchor"
        counts[f"{stage}_{why}"] += 1
        if pair:
            (rows if stage == "overrefusal" else anchors).append((pid, pairs.pair_row(g['prompt'], pair, stage, cfg.seed, cfg.k_student, cfg.tau_refusal)))
    picked = pairs.take_anchors(anchors, len(rows), cfg.anchor_ratio, cfg.seed)
    counts.update(pairs_overrefusal=len(rows), pairs_anchor=len(picked),
                  pairs_anchor_short=pairs.anchors_wanted(len(rows), cfg.anchor_ratio) - len(picked))
    if not safety:
        counts["pairs_chosen_safety_filter_skipped_no_judge"] = len(rows) + len(picked)
    rows = [r for _, r in sorted(rows + picked, key=lambda x: x[0])]
    counts["pairs_total"] = len(rows)
    note = ("chosen: not unsafe and 1 - p_unsafe >= tau_safe" if safety else
            "no safety judge: the tau_safe filter is skipped (counted); anchors use refusal as the safe answer")
    return finish(cfg, out, rows, {"counts": dict(counts), "judges": ids, "safety": note,
                                   "contaminated": contaminated}, {"student": cfg.student, "teacher": cfg.teacher},
                  "pairs", f"safety: {note}")


def parse_chooser(cls, argv: list[str]):
    """The config parser, plus --eval_files taking several paths and repeatable."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--eval_files", nargs="+", action="extend", default=[])
    known, rest = p.parse_known_args(argv)
    return dataclasses.replace(parse(cls, rest), eval_files=tuple(known.eval_files))


COMMANDS = {"generate": (GenerateConfig, generate), "select": (SelectConfig, select),
            "pairs": (PairsConfig, build_pairs)}


def main(cfg):
    return next(fn for cls, fn in COMMANDS.values() if isinstance(cfg, cls))(cfg)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python overgen.py {{{'|'.join(COMMANDS)}}} [--flags]")
    try:
        cls = COMMANDS[sys.argv[1]][0]
        main(parse_chooser(cls, sys.argv[2:]) if issubclass(cls, ChooseConfig) else parse(cls, sys.argv[2:]))
    except FatalAPIError as e:
        sys.exit(f"overgen: stopped: {e}")
