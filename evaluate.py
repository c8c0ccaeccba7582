"""Evaluation: generate -> judge -> score, each a cached stage; compare runs; select checkpoints.

    python evaluate.py run --model smollm2-135m --input demo --out_dir runs/eval/base
    python evaluate.py generate --model runs/sft/final --input demo,xstest_prompts.csv --output responses.jsonl
    torchrun --standalone --nproc_per_node=8 evaluate.py generate ...   # data-parallel, same file as 1 process
    python evaluate.py generate --backend openai --base_url http://localhost:8000/v1 --model served-name ...
    python evaluate.py judge --input responses.jsonl --output judged.jsonl --judge keyword --safety_judge proxy
    python evaluate.py judge --input responses.jsonl --output judged.jsonl --safety_judge llamaguard --safety_model DIR
    python evaluate.py score --input judged.jsonl --output results.json
    python evaluate.py compare --runs runs/eval/base,runs/eval/sft --out_dir runs/compare
    python evaluate.py select --start runs/eval/sft --runs runs/eval/step_100,runs/eval/step_200 --floor 0.95
    python evaluate.py winrate --input responses.jsonl --references refs.jsonl --output winrate.json --judge_model gpt-4o

generate appends one flushed line per answer, keyed by a hash of what decides it (model, sampling, prompt); a rerun
keeps every answer whose key still matches (refreshed with the current input's other fields) and generates the
rest. judge caches every judge answer in <output stem>.judge_cache.jsonl (porover/judging.py) and writes its
output in one go; re-scoring never re-calls a model or a judge.
Run folders hold responses.jsonl, judged.jsonl (+ its judge cache), results.json and results.md.
"""
import asyncio
import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from porover import benchmarks, dist, generation, judging, metrics, report
from porover.config import parse, provenance
from porover.data import DataError, prompt_messages, read_jsonl
from porover.store import Store, key_of, write_json, write_jsonl, write_text
from porover.winrate import WinRateConfig, winrate

GEN_FIELDS = ("response", "finish_reason", "n_tokens", "gen_model")


@dataclass
class GenerateConfig:
    """The model under test answers benchmark prompts: local transformers (batched, left-padded, greedy by
    default, data-parallel under torchrun) or any OpenAI-compatible server."""
    input: str = "demo"  # benchmark specs, comma-separated (porover.benchmarks): demo, demo:dev, a .jsonl, a .csv
    output: str | None = None
    model: str = "smollm2-135m"
    backend: Literal["local", "openai"] = "local"
    system_prompt: str | None = None  # None: the training convention (no system prompt)
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    # local backend
    batch_size: int | None = None  # default 16
    dtype: Literal["bf16", "fp32"] | None = None  # None: bf16 on CUDA, fp32 on CPU
    chat_template: str | None = None
    # openai backend
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int | None = None  # default 16


@dataclass
class JudgeConfig(judging.JudgeConfig):
    """The refusal judge on every record, the safety judge on toxic prompts only (other records get nulls)."""
    input: str | None = None  # generate's output
    output: str | None = None  # judged JSONL; <stem>.judge_cache.jsonl goes next to it


@dataclass
class ScoreConfig:
    """Not-Unsafe, Not-Overrefusal and F1 with intervals, per-benchmark and per-category rows, response quality."""
    input: str | None = None  # judged JSONL (refusal and safety fields)
    output: str | None = None  # results.json; the markdown table goes next to it (.md)
    usefulness_types: str = "seemingly_toxic"  # comma-separated prompt types whose Not-Overrefusal is U
    partial_is_refusal: bool = True  # refusal = full_refusal or partial_refusal
    n_boot: int = 2000
    seed: int = 0


@dataclass
class RunConfig(GenerateConfig, judging.JudgeConfig, ScoreConfig):
    """generate -> judge -> score into --out_dir, every stage cached."""
    out_dir: str = "runs/eval/run"
    safety_judge: Literal["none", "proxy", "llamaguard"] = "proxy"


@dataclass
class CompareConfig:
    """Several run folders in one markdown table and one safety-vs-usefulness plot, with paired differences
    against the first run."""
    runs: str = ""  # comma-separated run folders (each with judged.jsonl)
    out_dir: str = "runs/compare"
    plot: bool = True
    usefulness_types: str = "seemingly_toxic"
    partial_is_refusal: bool = True
    n_boot: int = 2000
    seed: int = 0


@dataclass
class SelectConfig:
    """Safety-floor checkpoint selection: the last run whose held-out Not-Unsafe rate is at least --floor x the
    starting model's. Evaluate checkpoints on the dev split, never on eval."""
    start: str = ""  # run folder of the starting model
    runs: str = ""  # run folders of the checkpoints, ordered by training step (or their exports' porover.json)
    floor: float = 0.95
    output: str | None = None  # default: selection.json next to the start run


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + suffix)


# --------------------------------------------------------------------------------------------------------------
# generate

def generate_errors(cfg: GenerateConfig, world: int) -> list[str]:
    errors = [] if cfg.output else ["--output is required"]
    other = ("base_url", "concurrency") if cfg.backend == "local" else ("batch_size", "dtype", "chat_template")
    errors += [f"--{k} does not apply to --backend {cfg.backend}" for k in other if getattr(cfg, k) is not None]
    if cfg.backend == "openai" and world > 1:
        errors.append("--backend openai runs in one process (the server batches; torchrun is for local generation)")
    return errors


def resume(out: Path, rows: list[dict], keys: list[str]) -> tuple[Store, list[int], Counter]:
    """Rewrite `out` with every row whose key is cached (its current fields + the cached answer); the rest to do."""
    store = Store(out, "gen_key")
    done, todo = [], []
    for i, k in enumerate(keys):
        c = store.get(k)
        if c is None:
            todo.append(i)
        else:
            done.append({**strip(rows[i]), **{f: c.get(f) for f in GEN_FIELDS}, "gen_key": k})
    counts = Counter(cached=len(done), todo=len(todo), not_reused=len(store.records) - len(done),
                     torn_lines=store.torn)
    store.rewrite(done)
    return store, todo, counts


def generate_openai(cfg, rows, todo, sink, errors: Store):
    from porover.client import Client, gather_cancelling
    client = Client(cfg.base_url, cfg.api_key_env, cfg.concurrency)

    async def one(i):
        res = await client.chat(rows[i]["_messages"], model=cfg.model, max_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p)
        if res.status == "ok" and res.choices:
            sink(i, {"response": res.text, "finish_reason": res.finish_reason,
                     "n_tokens": (res.usage or {}).get("completion_tokens")})
        else:
            errors.append({"key": key_of(rows[i]["id"], rows[i]["_messages"]), "id": rows[i]["id"],
                           "status": "failed", "error_class": res.error_class, "error": res.error})

    async def go():
        async with client:
            await gather_cancelling(one(i) for i in todo)
    asyncio.run(go())


def generate(cfg: GenerateConfig) -> Counter:
    rank, world, _ = dist.setup()
    if errors := generate_errors(cfg, world):
        raise ValueError("invalid config: " + "; ".join(errors))
    if cfg.backend == "local":  # the resolved dtype goes into the cache key: bf16 and fp32 answers differ
        cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size or 16,
                                  dtype=cfg.dtype or ("bf16" if torch.cuda.is_available() else "fp32"))
    else:
        cfg = dataclasses.replace(cfg, concurrency=cfg.concurrency or 16)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    rows = [{**r, "_messages": system + prompt_messages(r, cfg.input, r["id"])} for r in benchmarks.load_all(cfg.input)]
    model_id = generation.identity(cfg.model, cfg.chat_template) if cfg.backend == "local" else cfg.model
    spec = [model_id, cfg.backend, cfg.base_url, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.dtype]
    keys = [key_of(spec, r["id"], r["_messages"]) for r in rows]
    out = Path(cfg.output)
    store, plan = None, [None]
    if rank == 0:
        store, *plan = resume(out, rows, keys)
        plan = [tuple(plan)]
    if world > 1:
        torch.distributed.broadcast_object_list(plan, src=0)  # every rank runs rank 0's to-do list
    todo, counts = plan[0]
    dist.print0(f"generate: {len(rows)} prompts, {counts['cached']} cached, {len(todo)} to do -> {out}")

    def sink(i, res):
        store.append({**strip(rows[i]), **res, "gen_model": cfg.model, "gen_key": keys[i]})
        counts["generated"] += 1
        counts[f"finish_{res['finish_reason']}"] += 1
    if todo and cfg.backend == "local":
        generation.answer_all(cfg, [r["_messages"] for r in rows], keys, todo, lambda i, a: sink(i, {
            "response": a["text"], "finish_reason": a["finish_reason"], "n_tokens": a["n_tokens"]}))
    elif todo:
        with Store(sibling(out, ".errors.jsonl")) as errors:
            generate_openai(cfg, rows, todo, sink, errors)
        counts["failed"] = len(todo) - counts["generated"]
    if rank == 0:
        store.close()
        write_json(sibling(out, ".summary.json"), {
            "counts": counts, "config": dataclasses.asdict(cfg),
            **provenance({s: s.partition("@")[0] for s in cfg.input.split(",")}, world_size=world,
                         device=cfg.backend, seed="per batch (hash of its keys)")})
    dist.teardown()
    return counts


# --------------------------------------------------------------------------------------------------------------
# judge

def judged_fields(r: dict, ids: dict, safety: bool) -> dict:
    """The judges' verdicts on one record, as judged.jsonl spells them (safety fields null where not judged)."""
    s = r["_safety"] or {}
    return {"refusal": r["_refusal"], "refusal_label": r["_refusal_label"], "refusal_judge": ids["refusal"],
            "refusal_raw": r["_refusal_raw"], "refusal_status": "ok" if r["_refusal_label"] else "failed",
            "refusal_error": r.get("_refusal_error"),
            "unsafe": r["_unsafe"], "p_unsafe": r["_p_unsafe"], "safety_score": s.get("safety_score"),
            "safety_raw": {k: s[k] for k in ("raw", "categories", "p_safe_raw", "p_unsafe_raw") if k in s} or None,
            "safety_judge": ids["safety"], "safety_error": r.get("_safety_error"),
            "safety_status": "failed" if safety and r["_safety"] is None else "ok"}


def judge(cfg: JudgeConfig) -> Counter:
    errors = [f"--{k} is required" for k in ("input", "output") if not getattr(cfg, k)] + judging.config_errors(cfg)
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))
    rows = []
    for lineno, rec in read_jsonl(cfg.input):
        if missing := [f for f in ("id", "response", "type") if f not in rec]:
            raise DataError(f"{cfg.input}:{lineno}: missing field {missing[0]!r}")
        rows.append({**rec, "_messages": prompt_messages(rec, cfg.input, lineno), "_response": rec["response"],
                     "_type": rec["type"]})
    out = Path(cfg.output)
    with Store(sibling(out, ".judge_cache.jsonl")) as cache:
        counts = Counter(torn_lines=cache.torn)
        ids = judging.run(cfg, cache, counts, rows, [r for r in rows if r["_type"] == "toxic"])
    judged = []
    for r in rows:
        f = judged_fields(r, ids, cfg.safety_judge != "none" and r["_type"] == "toxic")
        counts.update([f"refusal_status_{f['refusal_status']}", f"refusal_{f['refusal_label']}"])
        if r["_type"] == "toxic":
            counts.update([f"safety_status_{f['safety_status']}", f"safety_unsafe_{f['unsafe']}"])
        judged.append({**strip(r), **f})
    write_jsonl(out, judged)
    print(f"judge: {len(rows)} records -> {out}; judges: {ids}; {dict(counts)}", file=sys.stderr)
    return counts


# --------------------------------------------------------------------------------------------------------------
# score, run, compare, select

def model_step(model: str | None) -> int | None:
    """The training step of an exported checkpoint (its porover.json), if the model is one."""
    meta = Path(model or "") / "porover.json"
    return json.loads(meta.read_text()).get("step") if model and meta.is_file() else None


def score(cfg: ScoreConfig, missing: dict | None = None) -> dict:
    """`missing` (from run): prompts per benchmark that have no response because generation failed."""
    if not cfg.input or not cfg.output:
        raise ValueError("invalid config: --input and --output are required")
    rows, counts, used = judging.read_judged(cfg.input, cfg.partial_is_refusal)
    res = metrics.summarize(rows, tuple(cfg.usefulness_types.split(",")), cfg.n_boot, cfg.seed)
    model = sorted({str(r.get("gen_model")) for r in rows})
    res.update(conventions=report.conventions(cfg.partial_is_refusal, used), counts=dict(counts), model=model,
               step=model_step(model[0]) if len(model) == 1 else None, config=dataclasses.asdict(cfg),
               generation_missing=missing or {})
    res.update(provenance({"input": cfg.input}, seed=cfg.seed, world_size=1, device="cpu"))
    if missing:
        print(f"score: {sum(missing.values())} prompts have no response (generation failed; see "
              f"responses.errors.jsonl) and are not in N: {missing}", file=sys.stderr)
    write_json(cfg.output, res)
    write_text(Path(cfg.output).with_suffix(".md"), report.markdown(res, f"Results: {', '.join(model)}"))
    return res


def fields_of(cls, cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}


def run(cfg: RunConfig) -> dict | None:
    out, (rank, _, _) = Path(cfg.out_dir), dist.setup()
    if cfg.output:
        raise ValueError("invalid config: run writes into --out_dir; --output is for the single stages")
    judge_flags = fields_of(judging.JudgeConfig, cfg)
    if cfg.judge != "llm" and not cfg.safety_base_url:  # the key variable is the model server's here, not a judge's
        judge_flags["api_key_env"] = judging.JudgeConfig.api_key_env
    stage = JudgeConfig(**judge_flags, input=str(out / "responses.jsonl"), output=str(out / "judged.jsonl"))
    if errors := judging.config_errors(stage):  # before any generation is paid for
        raise ValueError("invalid config: " + "; ".join(errors))
    generate(GenerateConfig(**{**fields_of(GenerateConfig, cfg), "output": stage.input}))
    if rank != 0:
        return None  # judging and scoring run on rank 0 only
    judge(stage)
    # A prompt whose generation failed every attempt (a content filter, say) has no response: out of N, said aloud.
    have = {r["id"] for _, r in read_jsonl(stage.input)}
    missing = Counter(r["benchmark"] for r in benchmarks.load_all(cfg.input) if r["id"] not in have)
    return score(ScoreConfig(stage.output, str(out / "results.json"), cfg.usefulness_types, cfg.partial_is_refusal,
                             cfg.n_boot, cfg.seed), missing=dict(missing))


def compare(cfg: CompareConfig) -> dict:
    runs = [r for r in cfg.runs.split(",") if r]
    if len(runs) < 2:
        raise ValueError("invalid config: --runs needs at least two run folders")
    plt = report.pyplot() if cfg.plot else None  # fail before the work, not after it
    types = tuple(cfg.usefulness_types.split(","))
    judged = [judging.read_judged(Path(r) / "judged.jsonl", cfg.partial_is_refusal) for r in runs]
    names = [Path(r).name for r in runs]
    prompt = lambda r: r.get("prompt", r.get("messages"))  # noqa: E731
    base = {(r["benchmark"], r["id"]): prompt(r) for r in judged[0][0]}
    for run_, (rows, _, _) in zip(runs[1:], judged[1:]):
        if bad := next((r for r in rows if base.get((r["benchmark"], r["id"]), prompt(r)) != prompt(r)), None):
            raise DataError(f"{run_}/judged.jsonl: id {bad['id']!r} ({bad['benchmark']}) has another prompt in "
                            f"{runs[0]}/judged.jsonl: paired tests need the same prompts")
    mixed = [k for k in ("refusal", "safety") if len({tuple(u[k]) for _, _, u in judged}) > 1]
    by_run = "; ".join(f"{n}: " + ", ".join(j for k in mixed for j in u[k]) for n, (_, _, u) in zip(names, judged))
    warning = (f"WARNING: the runs were judged by different {' and '.join(mixed)} judges ({by_run}): differences "
               "mix the judge with the model.") if mixed else ""
    if warning:
        print(warning, file=sys.stderr)
    summaries = [metrics.summarize(rows, types, cfg.n_boot, cfg.seed) for rows, _, _ in judged]
    diffs = [metrics.paired(judged[0][0], rows, types, cfg.n_boot, cfg.seed) for rows, _, _ in judged[1:]]
    used = {k: sorted({j for _, _, u in judged for j in u[k]}) for k in ("refusal", "safety")}
    conv = report.conventions(cfg.partial_is_refusal, used)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "compare.md", report.comparison(names, summaries, diffs, conv, warning))
    result = {"runs": runs, "summaries": [s["summary"] for s in summaries], "paired": diffs, "conventions": conv,
              "judges_differ": mixed,
              **provenance({f"{n}/judged.jsonl": str(Path(r) / "judged.jsonl") for n, r in zip(names, runs)})}
    write_json(out / "compare.json", result)
    if plt:
        report.plot(plt, names, summaries, out / "compare.png", conv["proxy"])
    return result


def select(cfg: SelectConfig) -> dict:
    runs = [r for r in cfg.runs.split(",") if r]
    if not cfg.start or not runs or not 0 < cfg.floor <= 1:
        raise ValueError("invalid config: --start, --runs and 0 < --floor <= 1 are required")
    res = {r: json.loads((Path(r) / "results.json").read_text()) for r in [cfg.start] + runs}
    steps = [res[r].get("step") for r in runs]
    if all(s is not None for s in steps):
        runs = [r for _, r in sorted(zip(steps, runs))]  # training order, whatever order they were given in
    start = res[cfg.start]["summary"]["not_unsafe"]["value"]
    if start is None:
        raise DataError(f"{cfg.start}/results.json: the starting model has no Not-Unsafe rate (no toxic prompts "
                        "judged): there is no floor to keep")
    threshold = cfg.floor * start - 1e-12  # 0.9 x 0.8 is 0.72000000000000001 in floats: a rate of 0.72 passes
    table = [{"run": r, "step": res[r].get("step"), "model": res[r].get("model"),
              **{k: res[r]["summary"][k]["value"] for k in ("not_unsafe", "not_overrefusal", "f1")}} for r in runs]
    kept = [row for row in table if row["not_unsafe"] is not None and row["not_unsafe"] >= threshold]
    out = {"start": cfg.start, "start_not_unsafe": start, "floor": cfg.floor, "threshold": threshold,
           "candidates": table, "selected": kept[-1]["run"] if kept else None,
           "model": kept[-1]["model"] if kept else None}
    write_json(cfg.output or Path(cfg.start) / "selection.json", out)
    print(f"select: threshold {report.pct(threshold)}% Not-Unsafe ({cfg.floor} x {report.pct(start)}%): "
          + (f"{out['selected']}" if kept else "no checkpoint meets the floor"))
    return out


COMMANDS = {"generate": (GenerateConfig, generate), "judge": (JudgeConfig, judge), "score": (ScoreConfig, score),
            "run": (RunConfig, run), "compare": (CompareConfig, compare), "select": (SelectConfig, select),
            "winrate": (WinRateConfig, winrate)}


def main(cfg):
    if not isinstance(cfg, GenerateConfig) and dist.setup()[1] > 1:
        raise RuntimeError("under torchrun only generate (and run's generate stage) is data-parallel: "
                           "run this command in one process")
    return next(fn for cls, fn in COMMANDS.values() if type(cfg) is cls)(cfg)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python evaluate.py {{{'|'.join(COMMANDS)}}} [--flags]")
    main(parse(COMMANDS[sys.argv[1]][0], sys.argv[2:]))
