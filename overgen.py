"""Overgeneration (SPEC §1 steps 1-2, §7): teacher candidates for every prompt.

    python overgen.py generate --input prompts.jsonl --output runs/teacher/general.jsonl --teacher_model gpt-4o --n 4
    python overgen.py generate --backend local --input prompts.jsonl --output runs/teacher/local.jsonl --n 2
    python overgen.py select --input runs/teacher/general.jsonl --output runs/sft/general.jsonl --strategy best \
        --safety_judge llamaguard --safety_model DIR --eval_files xstest.csv or-bench-hard-1k.csv

`generate` writes one record per (prompt, sample slot) to --output as soon as its request finishes, keyed
by a hash of everything that decides the completion (never the API key). A rerun skips finished keys, so a
killed run resumes without paying twice, and raising --n from 4 to 8 reuses slots 0-3. Failures go to
<output stem>.errors.jsonl with their class; counts, this run's tokens and cost, the tokens and cost of every run on
this output (*_all_runs) and provenance to <output stem>.summary.json.

`select` keeps one candidate per prompt as SFT data, after decontamination and per-candidate filters, at
random or by judges; every drop is counted in <output stem>.summary.json, and judge answers are cached in
<output stem>.judge_cache.jsonl so that a rerun never asks a judge twice.

`pairs` builds POROver's preference pairs (Algorithm 1, porover/pairs.py) from the student's samples and the
teacher's candidates on the same prompts, with the same judges, caches, decontamination and counts:
    python overgen.py generate --backend local --teacher_model runs/sft/final --input prompts.jsonl \
        --output runs/pairs/student.jsonl --n 4 --temperature 1.0
    python overgen.py pairs --student runs/pairs/student.jsonl --teacher runs/teacher/st.jsonl \
        --output runs/pairs/pairs.jsonl --k_student 4 --tau_refusal 0.5
"""
import argparse
import asyncio
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from porover import benchmarks, decontam
from porover.client import Client, FatalAPIError, endpoint_host, estimate_tokens, gather_cancelling
from porover.config import parse, provenance, write_json
from porover.data import DataError, prompt_messages, read_jsonl

# US$ per million (input, output) tokens: OpenAI list prices as of 2025, for the running estimate only.
# Override with --price_table (a JSON file {"model": [input, output]}); the longest matching prefix wins.
PRICES = {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "gpt-4.1": (2.00, 8.00),
          "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40), "gpt-3.5-turbo": (0.50, 1.50)}
# Fields generate adds to a prompt record; a prompt record that already has one is an error.
RECORD_FIELDS = ("slot", "key", "text", "finish_reason", "refusal", "usage", "request_n", "model", "seed", "status",
                 "attempts", "latency", "teacher_model", "host")
OPENAI_DEFAULTS = {"concurrency": 16, "timeout": 120.0, "max_attempts": 6, "backoff": 1.0, "backoff_max": 60.0}
LOCAL_DEFAULTS = {"batch_size": 8}
ESTIMATE_LABEL = "estimate: prompt tokens by the chars/4 heuristic, completion tokens at the --max_tokens bound"


@dataclass
class GenerateConfig:
    """Teacher candidates: --n completions per prompt from an OpenAI-compatible endpoint or a local model."""
    input: str | None = None  # prompts JSONL (SPEC §3), or benchmark specs (an OR-Bench/XSTest CSV, demo:train)
    output: str = "runs/teacher/candidates.jsonl"
    backend: Literal["openai", "local"] = "openai"
    teacher_model: str | None = None  # default: gpt-4o (openai), smollm2-135m (local)
    system_prompt: str | None = None  # the teacher's only; never copied into SFT data
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    retry_failed: Literal["transient", "all", "none"] = "transient"  # which failed keys a rerun tries again
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
    for k in ("n", "max_tokens", "concurrency", "max_attempts", "batch_size"):
        if getattr(cfg, k) is not None and getattr(cfg, k) < 1:
            errors.append(f"--{k} must be at least 1")
    for k in ("rpm", "tpm", "timeout", "backoff", "backoff_max"):
        if getattr(cfg, k) is not None and not getattr(cfg, k) > 0:
            errors.append(f"--{k} must be positive (leave it out for no limit)" if k in ("rpm", "tpm") else
                          f"--{k} must be positive")
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))
    model = cfg.teacher_model or ("gpt-4o" if cfg.backend == "openai" else "smollm2-135m")
    return dataclasses.replace(cfg, teacher_model=model, **{k: v for k, v in mine.items() if getattr(cfg, k) is None})


def slot_key(messages: list[dict], host: str, cfg: GenerateConfig, slot: int) -> str:
    """sha256 of what decides a completion; the seed is derived from it, so it is not an input."""
    spec = {"messages": messages, "system_prompt": cfg.system_prompt, "host": host, "model": cfg.teacher_model,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "slot": slot}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def seed_of(key: str) -> int:
    return int(key[:8], 16)  # distinct per slot, and the same on every rerun


def load_cache(path: Path) -> tuple[list[dict], int]:
    """Records of one of our append-only files, after cutting a torn last line (left by a kill): (records, torn)."""
    if not path.exists():
        return [], 0
    with open(path, "r+b") as f:
        size = end = f.seek(0, 2)
        while end and (f.seek(end - 1), f.read(1))[1] != b"\n":  # a torn line is one line: short to walk back
            end -= 1
        if end < size:
            f.truncate(end)
    return [obj for _, obj in read_jsonl(path)], int(end < size)


def price_of(model: str, table: dict) -> tuple[float, float] | None:
    match = max((k for k in table if model.startswith(k)), key=len, default=None)
    return tuple(table[match]) if match else None


def read_prompts(cfg: GenerateConfig) -> list[tuple[dict, list[dict]]]:
    """(prompt record, messages sent to the teacher) per prompt; ids must be unique strings. A .jsonl input is read
    as it is; anything else is a benchmark spec (porover.benchmarks: an OR-Bench or XSTest CSV, `demo:train`, ...),
    whose records arrive typed and with ids."""
    prompts, seen = [], set()
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    source = read_jsonl(cfg.input) if cfg.input.endswith(".jsonl") and "," not in cfg.input else \
        ((f"id {r['id']}", r) for r in benchmarks.load_all(cfg.input))
    for where, obj in source:
        if not isinstance(obj.get("id"), str):
            raise DataError(f"{cfg.input}:{where}: field 'id' must be a string")
        if obj["id"] in seen:
            raise DataError(f"{cfg.input}:{where}: field 'id': duplicate {obj['id']!r}")
        if clash := [k for k in RECORD_FIELDS if k in obj]:
            raise DataError(f"{cfg.input}:{where}: field {clash[0]!r} is reserved for generate's records")
        seen.add(obj["id"])
        prompts.append((obj, system + prompt_messages(obj, cfg.input, where)))
    return prompts


def sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + suffix)


class Sink:
    """The append-only outputs (one flushed line per finished slot or failure), counts, tokens and cost."""

    def __init__(self, cfg: GenerateConfig, out: Path, total: int):
        self.cfg, self.counts, self.tokens, self.cost = cfg, Counter(), Counter(), 0.0
        self.prices = load_prices(cfg)
        self.out = open(out, "a", encoding="utf-8")
        self.err = open(sibling(out, ".errors.jsonl"), "a", encoding="utf-8")
        self.bar = tqdm(total=total, desc="generate", dynamic_ncols=True)

    def write(self, f, rec: dict):
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()  # a killed run loses at most the line being written, which resume truncates

    def record(self, obj: dict, slot: int, key: str, choice: dict, meta: dict):
        status = "filtered" if choice["finish_reason"] == "content_filter" else "ok"
        self.write(self.out, {**obj, "slot": slot, "key": key, "text": choice["text"],
                              "finish_reason": choice["finish_reason"], "refusal": choice.get("refusal"),
                              "status": status, **meta})
        self.counts[status] += 1
        self.counts["finish_" + str(choice["finish_reason"])] += 1
        self.counts["api_refusal"] += bool(choice.get("refusal"))
        self.tick()

    def failure(self, obj: dict, slot: int, key: str, error_class: str, error: str, attempts: int, latency: float):
        self.write(self.err, {"id": obj["id"], "slot": slot, "key": key, "status": "failed", "error_class": error_class,
                              "error": error, "attempts": attempts, "latency": round(latency, 3), "time": time.time()})
        self.counts[f"failed_{error_class}"] += 1
        self.tick()

    def usage(self, model: str | None, usage: dict | None):
        if not usage:
            return
        pin, pout = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        self.tokens.update(prompt=pin, completion=pout)
        price = price_of(model or self.cfg.teacher_model, self.prices)
        if price is None:
            self.counts["unpriced_requests"] += 1
        else:
            self.cost += (pin * price[0] + pout * price[1]) / 1e6

    def tick(self):
        c = self.counts
        self.bar.set_postfix(ok=c["ok"], failed=sum(v for k, v in c.items() if k.startswith("failed_")),
                             filtered=c["filtered"], tokens=sum(self.tokens.values()), cost=f"${self.cost:.4f}",
                             refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()
        self.out.close()
        self.err.close()


async def run_openai(cfg: GenerateConfig, jobs: list, sink: Sink):
    """Every job (prompt record, messages, missing [(slot, key)]) through the client, `concurrency` at a time."""
    client = Client(cfg.base_url, cfg.api_key_env, cfg.concurrency, cfg.rpm, cfg.tpm, cfg.timeout, cfg.max_attempts,
                    cfg.backoff, cfg.backoff_max)
    use_n = cfg.api_n
    meta = {"teacher_model": cfg.teacher_model, "host": client.host}

    async def request(obj, messages, slots):
        """One request for len(slots) choices; returns how many slots it settled (written or failed)."""
        nonlocal use_n
        try:
            res = await client.chat(messages, model=cfg.teacher_model, max_tokens=cfg.max_tokens,
                                    temperature=cfg.temperature, top_p=cfg.top_p, n=len(slots),
                                    seed=seed_of(slots[0][1]))
        except FatalAPIError as e:
            for slot, key in slots:
                sink.failure(obj, slot, key, "fatal", str(e), 1, 0.0)
            raise
        sink.usage(res.model, res.usage)
        sink.counts["requests"] += 1
        sink.counts["retries"] += res.attempts - 1
        if res.status == "ok" and not res.choices:
            res.status, res.error_class, res.error = "failed", "transient", "the server returned no choices"
        if res.status != "ok":
            for slot, key in slots:
                sink.failure(obj, slot, key, res.error_class, res.error, res.attempts, res.latency)
            return len(slots)
        if len(res.choices) < len(slots):  # the server ignored n: verified here, fanned out from now on
            sink.counts["n_short_responses"] += 1
            if use_n:
                tqdm.write(f"{client.host} returned {len(res.choices)} of {len(slots)} choices: "
                           "one request per sample with distinct seeds from now on")
            use_n = False
        m = {"usage": res.usage, "request_n": len(slots), "model": res.model, "seed": res.seed,
             "attempts": res.attempts, "latency": round(res.latency, 3), **meta}
        for (slot, key), choice in zip(slots, res.choices):
            sink.record(obj, slot, key, choice, m)
        return min(len(slots), len(res.choices))

    async def prompt_job(obj, messages, slots):
        while slots and use_n and len(slots) > 1:
            slots = slots[await request(obj, messages, slots):]
        await gather_cancelling(request(obj, messages, [s]) for s in slots)

    queue = iter(jobs)

    async def worker():
        for job in queue:  # the workers share one iterator: a prompt is taken by exactly one of them
            await prompt_job(*job)

    try:
        async with client:
            await gather_cancelling(worker() for _ in range(cfg.concurrency))
    finally:
        sink.counts.update({f"client_{k}": v for k, v in client.stats.items()})  # sent, retries by cause


def run_local(cfg: GenerateConfig, jobs: list, sink: Sink):
    """A transformers model, batches of `batch_size` (prompt, slot) rows, left-padded, sampled with a seed
    taken from the batch's keys (the same batch gives the same samples on every machine and rerun)."""
    import torch

    from porover import chat, models

    tokenizer = models.load_tokenizer(cfg.teacher_model)
    eot_id = chat.prepare_tokenizer(tokenizer, cfg.chat_template)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.load_model(cfg.teacher_model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.to(device).eval()
    rows = []
    for obj, messages, slots in jobs:
        ids = chat.encode_prompt(tokenizer, messages)
        rows += [(obj, slot, key, ids) for slot, key in slots]
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.temperature > 0 \
        else {"do_sample": False}
    pad = tokenizer.pad_token_id
    for b in range(0, len(rows), cfg.batch_size):
        batch = rows[b:b + cfg.batch_size]
        T = max(len(r[3]) for r in batch)
        input_ids = torch.tensor([[pad] * (T - len(r[3])) + r[3] for r in batch], device=device)  # (B, T)
        attention = torch.tensor([[0] * (T - len(r[3])) + [1] * len(r[3]) for r in batch], device=device)  # (B, T)
        seed = int(hashlib.sha256("".join(r[2] for r in batch).encode()).hexdigest()[:15], 16)
        torch.manual_seed(seed)
        t0 = time.monotonic()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=cfg.max_tokens,
                                 eos_token_id=eot_id, pad_token_id=pad, **sampling)[:, T:]  # (B, new)
        latency = round(time.monotonic() - t0, 3)
        sink.counts["requests"] += 1
        for (obj, slot, key, ids), row in zip(batch, out.tolist()):
            stop = eot_id in row
            row = row[:row.index(eot_id)] if stop else row
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(row) + stop}
            sink.tokens.update(prompt=len(ids), completion=usage["completion_tokens"])
            sink.record(obj, slot, key, {"text": tokenizer.decode(row, skip_special_tokens=True),
                                         "finish_reason": "stop" if stop else "length"},
                        {"usage": usage, "request_n": 1, "model": cfg.teacher_model, "seed": seed, "attempts": 1,
                         "latency": latency, "teacher_model": cfg.teacher_model, "host": "local"})


def load_prices(cfg: GenerateConfig) -> dict:
    if not cfg.price_table:
        return PRICES
    try:
        table = json.loads(Path(cfg.price_table).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{cfg.price_table}: cannot read the price table ({e})") from None
    if not isinstance(table, dict) or not all(isinstance(v, list) and len(v) == 2 and
                                              all(isinstance(x, (int, float)) for x in v) for v in table.values()):
        raise DataError(f'{cfg.price_table}: a price table is {{"model prefix": [USD per 1M input tokens, USD per 1M '
                        'output tokens], ...}')
    return {k: tuple(v) for k, v in table.items()}


def dry_run(cfg: GenerateConfig, jobs: list) -> dict:
    """What the run would send, without sending it (an upper bound on completion tokens)."""
    requests = []  # (choices, prompt tokens) per request
    for _, messages, slots in jobs:
        p = estimate_tokens(messages)
        requests += [(len(slots), p)] if cfg.api_n and cfg.backend == "openai" else [(1, p)] * len(slots)
    prompt, completion = sum(p for _, p in requests), sum(k for k, _ in requests) * cfg.max_tokens
    price = price_of(cfg.teacher_model, load_prices(cfg)) if cfg.backend == "openai" else (0.0, 0.0)
    return {"label": ESTIMATE_LABEL, "requests": len(requests), "prompt_tokens": prompt,
            "completion_tokens_max": completion,
            "cost_usd_max": None if price is None else (prompt * price[0] + completion * price[1]) / 1e6}


def plan(cfg: GenerateConfig, out: Path) -> tuple[list, Counter]:
    """Jobs (prompt record, messages, [(slot, key)] still to do) after what earlier runs finished or failed."""
    prompts = read_prompts(cfg)
    # A local model folder enters the keys by its files: retrained in place, it gets new samples, not stale ones.
    host = f"local:{fingerprint(cfg.teacher_model)}" if cfg.backend == "local" else endpoint_host(cfg.base_url)
    if cfg.chat_template:  # another template is other tokens in front of the model
        host += "|template:" + (cfg.chat_template if cfg.chat_template == "chatml" else
                                hashlib.sha256(Path(cfg.chat_template).read_bytes()).hexdigest()[:16])
    done, torn = load_cache(out)
    errors, torn_errors = load_cache(sibling(out, ".errors.jsonl"))
    finished = {r["key"] for r in done}
    last_error = {e["key"]: e["error_class"] for e in errors if e["key"] not in finished}  # the latest wins
    # A fatal error (a bad key, no quota) says nothing about the item: "transient" retries it too.
    retry = {"all": {"transient", "fatal", "permanent"}, "transient": {"transient", "fatal"}, "none": set()}
    counts = Counter(prompts=len(prompts), slots=len(prompts) * cfg.n, finished_before=0,
                     torn_lines_truncated=torn + torn_errors)
    jobs = []
    for obj, messages in prompts:
        slots = []
        for slot in range(cfg.n):
            key = slot_key(messages, host, cfg, slot)
            if key in finished:
                counts["finished_before"] += 1
            elif key in last_error and last_error[key] not in retry[cfg.retry_failed]:
                counts[f"not_retried_{last_error[key]}"] += 1
            else:
                slots.append((slot, key))
        if slots:
            jobs.append((obj, messages, slots))
    counts["todo"] = sum(len(j[2]) for j in jobs)
    return jobs, counts


def generate(cfg: GenerateConfig) -> dict:
    cfg = resolve(cfg)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(sibling(out, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS even on SIGKILL
        except BlockingIOError:
            raise RuntimeError(f"{out}: another generate run is writing it") from None
        jobs, counts = plan(cfg, out)
        print(f"{counts['prompts']} prompts x {cfg.n} = {counts['slots']} slots: {counts['finished_before']} "
              f"finished before, {counts['todo']} to do, {counts['torn_lines_truncated']} torn line(s) truncated",
              file=sys.stderr)
        summary, sink = {"config": dataclasses.asdict(cfg), "fatal": None}, None
        summary_path = sibling(out, ".summary.json")
        try:
            if cfg.dry_run:
                summary["dry_run"] = dry_run(cfg, jobs)
                print(json.dumps(summary["dry_run"]), file=sys.stderr)
            elif jobs:
                sink = Sink(cfg, out, counts["todo"])
                if cfg.backend == "local":
                    run_local(cfg, jobs, sink)
                else:
                    asyncio.run(run_openai(cfg, jobs, sink))
        except FatalAPIError as e:
            summary["fatal"] = str(e)
            raise
        finally:  # also after a fatal error or Ctrl-C: what was done is accounted for
            # tokens and cost_usd are this run's; the *_all_runs totals carry over every run into this output.
            before = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            # (a summary written before these totals existed holds only its own run's)
            tokens_all = Counter(before.get("tokens_all_runs", before.get("tokens", {})))
            cost_all = before.get("cost_usd_all_runs", before.get("cost_usd", 0.0))
            if sink is not None:
                sink.close()
                counts.update(sink.counts)
                tokens_all.update(sink.tokens)
                cost_all += sink.cost
                summary.update(tokens=dict(sink.tokens), cost_usd=round(sink.cost, 6),
                               price_table=cfg.price_table or "built-in list prices (overgen.PRICES)")
            summary.update(tokens_all_runs=dict(tokens_all), cost_usd_all_runs=round(cost_all, 6))
            summary["counts"] = dict(counts)
            summary.update(provenance({"input": cfg.input, "price_table": cfg.price_table}, world_size=1,
                                      device=cfg.backend, seed="per key (overgen.seed_of)"))
            write_json(summary_path, summary)
    return summary


# ---------------------------------------------------------------------------------------------------------
# select: one teacher completion per prompt, as SFT data

DROP_REASONS = ("content_filter", "status_not_ok", "empty", "truncated", "duplicate", "degenerate")
JUDGE_FLAGS = ("judge", "judge_model", "template", "judge_max_tokens", "base_url", "api_key_env", "concurrency",
               "partial_is_refusal", "safety_judge", "safety_model", "safety_base_url", "reward_model")


@dataclass
class JudgeConfig:
    """The judges and the decontamination that select and pairs share."""
    seed: int = 0
    judge: Literal["keyword", "llm"] = "keyword"  # the refusal judge
    judge_model: str | None = None  # llm: the served judge
    template: str | None = None  # llm: a template file with {prompt} and {response}
    judge_max_tokens: int = 512  # llm judge reply budget
    base_url: str | None = None  # llm judge endpoint
    api_key_env: str = "OPENAI_API_KEY"  # for the llm judge and a served Llama Guard
    concurrency: int = 16
    partial_is_refusal: bool = True  # refusal = full_refusal or partial_refusal
    safety_judge: Literal["none", "llamaguard", "proxy"] = "none"
    safety_model: str | None = None  # llamaguard: a local model dir, or the served name with --safety_base_url
    safety_base_url: str | None = None
    eval_files: tuple[str, ...] = ()  # --eval_files a.jsonl b.csv ... (repeatable): decontaminate against these
    ngram: int = decontam.NGRAM
    near_threshold: float = decontam.THRESHOLD
    judge_cache: str | None = None  # default: <output stem>.judge_cache.jsonl


@dataclass
class SelectConfig(JudgeConfig):
    """One candidate per prompt (SPEC §1 steps 1-2): generate's candidates in, SFT JSONL out (in id order).

    random: a seeded uniform choice among the candidates that pass the filters. best, per prompt type: general
    and seemingly_toxic -> not a refusal and not unsafe, then the highest reward; toxic -> not unsafe with the
    lowest p_unsafe under Llama Guard, or (no safety judge) a refusal. Remaining ties: a seeded random choice."""
    input: str | None = None  # teacher candidates (generate's output)
    output: str | None = None  # SFT JSONL; <stem>.summary.json and <stem>.judge_cache.jsonl go next to it
    strategy: Literal["random", "best"] = "best"
    reward_model: str | None = None  # a transformers sequence-classification model; reward = its last logit
    keep_truncated: bool = False  # keep finish_reason=length candidates, written with "truncated": true


def judge_errors(cfg: JudgeConfig, required: tuple[str, ...], judged: bool) -> list[str]:
    """A judge flag that the judges in use would ignore is an error, never a silent no-op."""
    def unused(names, why, when):
        return [f"--{k} {why}" for k in names if when and getattr(cfg, k) != getattr(type(cfg), k)]
    e = [f"--{k} is required" for k in required if not getattr(cfg, k)]
    e += unused(JUDGE_FLAGS, "does not apply to --strategy random", not judged)
    e += unused(("judge_model", "template", "judge_max_tokens", "base_url"), "applies to --judge llm only",
                cfg.judge != "llm")
    e += unused(("safety_model", "safety_base_url"), "applies to --safety_judge llamaguard only",
                cfg.safety_judge != "llamaguard")
    e += unused(("api_key_env", "concurrency"), "applies to a served judge only",
                cfg.judge != "llm" and not cfg.safety_base_url)
    e += unused(("ngram", "near_threshold"), "applies only with --eval_files", not cfg.eval_files)
    if cfg.judge == "llm" and not cfg.judge_model:
        e.append("--judge llm needs --judge_model")
    if cfg.safety_judge == "llamaguard" and not cfg.safety_model:
        e.append("--safety_judge llamaguard needs --safety_model")
    if cfg.ngram < decontam.MIN_WORDS or not 0 < cfg.near_threshold <= 1:
        e.append(f"--ngram must be at least {decontam.MIN_WORDS} and --near_threshold in (0, 1]")
    return e


def with_tuple_eval_files(cfg):
    return dataclasses.replace(cfg, eval_files=(cfg.eval_files,) if isinstance(cfg.eval_files, str) else
                               tuple(cfg.eval_files))


def resolve_select(cfg: SelectConfig) -> SelectConfig:
    cfg = with_tuple_eval_files(cfg)
    if e := judge_errors(cfg, ("input", "output"), cfg.strategy == "best"):
        raise ValueError("invalid config: " + "; ".join(e))
    return cfg


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
        g["cands"].append({**obj, "_messages": messages, "_prompt": messages[-1]["content"], "_type": obj.get("type")})
    for g in groups.values():  # slot order: generate writes in finishing order, which no choice may depend on
        g["cands"].sort(key=lambda c: c["slot"] if isinstance(c.get("slot"), int) else -1)
    return groups


def drop_reason(c: dict, seen: set, keep_truncated: bool) -> str | None:
    from porover.metrics import is_degenerate
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


def fingerprint(name: str) -> str:
    """A local model folder by its files' names, sizes and mtimes (retrained in place = a new judge); else the name."""
    if not os.path.isdir(name):
        return name
    files = [(str(p.relative_to(name)), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(name).rglob("*"))]
    return f"{name}#{hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]}"


class JudgeCache:
    """Judge answers (LLM, Llama Guard, reward model) in an append-only JSONL keyed by the judge's id (model,
    template version, endpoint) and the candidate (key, prompt, text); a rerun never asks a judge twice. Failures
    are not stored (asked again next run). The keyword and proxy judges are pure functions, simply recomputed."""

    def __init__(self, path: Path):
        records, self.torn = load_cache(path)
        self.results, self.path = {r["cache_key"]: r["result"] for r in records}, path

    def run(self, name: str, judge_id: str, cands: list[dict], score, counts: Counter):
        """c[name] = the cached answer, else score(todo, put) calls put(c, answer or None) as each one finishes."""
        key = {id(c): hashlib.sha256(json.dumps([judge_id, c.get("key"), c["_messages"], c["text"]]).encode())
               .hexdigest() for c in cands}
        for c in cands:
            c[name] = self.results.get(key[id(c)])
        todo = [c for c in cands if c[name] is None]
        counts[f"{name}_cached"] += len(cands) - len(todo)
        with open(self.path, "a", encoding="utf-8") as f:
            def put(c, answer):
                c[name] = answer
                counts[f"{name}_{'failed' if answer is None else 'judged'}"] += 1
                if answer is not None:
                    f.write(json.dumps({"cache_key": key[id(c)], "judge": judge_id, "result": answer}) + "\n")
                    f.flush()  # a killed run keeps every answer it paid for
            if todo:
                score(todo, put)


def remote(cfg: SelectConfig, base_url: str | None, request, parse):
    """A scorer through the shared client: every request concurrently, each answer stored as it arrives."""
    def score(todo, put):
        client = Client(base_url, cfg.api_key_env, cfg.concurrency)

        async def one(c):
            res = await client.chat(**request(c))
            put(c, parse(res) if res.status == "ok" else None)

        async def go():
            async with client:
                await gather_cancelling(one(c) for c in todo)
        asyncio.run(go())
    return score


@functools.cache
def load_local(path: str, reward: bool, version: str):
    """(tokenizer, model, device), loaded once per process and folder `version` (fingerprint): pairs judges the
    student's and the teacher's texts with the same Llama Guard."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from porover import models
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = (AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype) if reward else
             models.load_model(path, dtype=dtype)).to(device).eval()
    return models.load_tokenizer(path), model, device


def local(path: str, reward: bool):
    """A scorer with a local transformers model: Llama Guard (judges.llamaguard_score), or a reward model whose
    score is the last logit of its sequence-classification head on its own chat template (one sequence at a time:
    no padding to get wrong)."""
    def score(todo, put):
        import torch

        from porover import judges
        tok, model, device = load_local(path, reward, fingerprint(path))
        for c in todo:
            if not reward:
                put(c, judges.llamaguard_score(model, tok, c["_prompt"], c["text"]))
                continue
            conv = c["_messages"] + [{"role": "assistant", "content": c["text"]}]
            text = tok.apply_chat_template(conv, tokenize=False) if tok.chat_template else \
                "\n\n".join(m["content"] for m in conv)
            ids = tok(text, add_special_tokens=not tok.chat_template, return_tensors="pt").input_ids  # (1, T)
            with torch.no_grad():
                put(c, {"reward": model(input_ids=ids.to(device)).logits[0, -1].float().item()})  # (1, num_labels)
    return score


def run_judges(cfg: SelectConfig, cands: list[dict], cache: JudgeCache, counts: Counter) -> dict:
    """Refusal and safety answers on every candidate left; returns the judges' ids for the summary."""
    from porover import judges
    if cfg.judge == "keyword":
        ids = {"refusal": "keyword (porover.judges.keyword_judge at the recorded git commit)"}
        for c in cands:
            c["refusal"] = {"label": judges.keyword_judge(c["text"], c["_prompt"])}
    else:
        ids = {"refusal": f"llm:{cfg.judge_model}@{judges.llm_template(cfg.template)[1]}|{endpoint_host(cfg.base_url)}"
                          f"|max_tokens={cfg.judge_max_tokens}"}
        cache.run("refusal", ids["refusal"], cands, remote(cfg, cfg.base_url, lambda c: {
            "messages": judges.llm_judge_messages(c["_prompt"], c["text"], cfg.template), "model": cfg.judge_model,
            "max_tokens": cfg.judge_max_tokens, "temperature": 0.0},
            lambda res: {"label": judges.parse_llm_judge(res.text), "raw": res.text}), counts)
    if cfg.safety_judge == "llamaguard" and cfg.safety_base_url:
        ids["safety"] = f"llamaguard:{cfg.safety_model}|{endpoint_host(cfg.safety_base_url)}"

        def parse_guard(res):  # the client's {"top": {token: logprob}} per position -> OpenAI's layout
            top = [[{"token": t, "logprob": v} for t, v in pos["top"].items()] for pos in res.logprobs or []]
            return {**judges.parse_llamaguard(res.text), "raw": res.text,
                    "p_unsafe": judges.p_unsafe_from_top_logprobs(top or None)}
        cache.run("safety", ids["safety"], cands, remote(cfg, cfg.safety_base_url, lambda c: {
            "messages": [{"role": "user", "content": c["_prompt"]}, {"role": "assistant", "content": c["text"]}],
            "model": cfg.safety_model, "max_tokens": 16, "temperature": 0.0, "logprobs": 5}, parse_guard), counts)
    elif cfg.safety_judge == "llamaguard":
        ids["safety"] = f"llamaguard:{fingerprint(cfg.safety_model)}"
        cache.run("safety", ids["safety"], cands, local(cfg.safety_model, reward=False), counts)
    else:
        ids["safety"] = "proxy (refused = not unsafe, on toxic prompts only)" if cfg.safety_judge == "proxy" else "none"
    for c in cands:
        label = (c["refusal"] or {}).get("label")
        c["_refusal"] = None if label is None else judges.is_refusal(label, cfg.partial_is_refusal)
        counts[f"label_{label or 'judge_failed'}"] += 1
        s = c.get("safety") or {}
        c["_p_unsafe"], c["_unsafe"] = s.get("p_unsafe"), s.get("unsafe")  # the verdict; p_unsafe without one
        if c["_unsafe"] is None and c["_p_unsafe"] is not None:
            c["_unsafe"] = c["_p_unsafe"] > 0.5
        if cfg.safety_judge == "proxy":
            c["_unsafe"] = judges.proxy_safety(c["_refusal"], c["_type"] == "toxic")["unsafe"]
        if cfg.safety_judge == "llamaguard":
            counts["safety_p_unsafe_null"] += c["_p_unsafe"] is None  # a server without logprobs: counted
    return ids


def ineligible(c: dict, cfg: SelectConfig, counts: Counter) -> str | None:
    """Why a candidate cannot be best for its prompt type, or None."""
    if c["_refusal"] is None:
        return "refusal_unjudged"  # a failed or unparseable judgement is never guessed
    if c["_type"] == "toxic" and cfg.safety_judge != "llamaguard":
        return None if c["_refusal"] else "complied_with_toxic"  # no safety score: a refusal is the safe answer
    if c["_type"] != "toxic" and c["_refusal"]:
        return "refusal"
    if cfg.safety_judge != "llamaguard":
        counts["safety_filter_skipped_no_judge"] += 1  # none, or the proxy on a benign prompt: skipped, not faked
        return None
    return "safety_unjudged" if c["_unsafe"] is None else "unsafe" if c["_unsafe"] else None


def rank(c: dict) -> tuple:
    """Smaller is better. A complete answer before a cut one (--keep_truncated); toxic: the lowest p_unsafe, a full
    refusal over a partial one, then reward; other types: the highest reward, then the lowest p_unsafe."""
    p = 1.0 if c["_p_unsafe"] is None else c["_p_unsafe"]
    r = -(c.get("reward") or {}).get("reward", 0.0)
    cut = c.get("finish_reason") == "length"
    return (cut, p, c["refusal"]["label"] != "full_refusal", r) if c["_type"] == "toxic" else (cut, r, p)


def select(cfg: SelectConfig) -> dict:
    cfg = resolve_select(cfg)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = read_candidates(cfg.input)
    counts = Counter({"read_prompts": len(groups), "read_candidates": sum(len(g["cands"]) for g in groups.values())}
                     | {f"decontam_{k}": 0 for k in ("exact", "normalised", "near", "candidates")}
                     | {f"dropped_{r}": 0 for r in DROP_REASONS} | {"kept_truncated": 0})
    index = decontam.load_index(cfg.eval_files, cfg.ngram) if cfg.eval_files else None
    contaminated, pool = [], []
    for pid, g in groups.items():
        g["kept"], g["eligible"] = [], []
        if cfg.strategy == "best" and g["cands"][0]["_type"] not in ("general", "toxic", "seemingly_toxic"):
            raise DataError(f"{cfg.input}:{g['line']}: field 'type' must be general, toxic or seemingly_toxic for "
                            f"--strategy best, got {g['cands'][0]['_type']!r}")
        if index and (hit := decontam.match(decontam.prompt_text(g["messages"]), index, cfg.near_threshold)):
            counts[f"decontam_{hit['kind']}"] += 1
            counts["decontam_candidates"] += len(g["cands"])
            contaminated.append({"id": pid, **hit})
            continue
        seen = set()
        reasons = [drop_reason(c, seen, cfg.keep_truncated) for c in g["cands"]]
        counts.update(f"dropped_{r}" for r in reasons if r)
        g["kept"] = [c for c, r in zip(g["cands"], reasons) if r is None]
        counts["kept_truncated"] += sum(c.get("finish_reason") == "length" for c in g["kept"])
        counts["prompts_no_candidate_left"] += not g["kept"]
        pool += g["kept"]
    cache = JudgeCache(Path(cfg.judge_cache or sibling(out, ".judge_cache.jsonl")))
    counts["cache_torn_lines_truncated"] = cache.torn
    judge_ids = run_judges(cfg, pool, cache, counts) if cfg.strategy == "best" else {}
    for g in groups.values() if cfg.strategy == "best" else ():
        reasons = [ineligible(c, cfg, counts) for c in g["kept"]]
        counts.update(f"ineligible_{r}" for r in reasons if r)
        g["eligible"] = [c for c, r in zip(g["kept"], reasons) if r is None]
        counts["prompts_no_eligible"] += bool(g["kept"]) and not g["eligible"]
    if cfg.reward_model:
        judge_ids["reward"] = f"reward:{fingerprint(cfg.reward_model)}"
        cache.run("reward", judge_ids["reward"], [c for g in groups.values() for c in g["eligible"]],
                  local(cfg.reward_model, reward=True), counts)
    rows = []
    for pid, g in sorted(groups.items()):  # id order: the same file whatever order generate's requests finished in
        rng = random.Random(f"{cfg.seed}:{pid}")  # per prompt: adding or removing prompts changes no other choice
        if cfg.strategy == "random":
            choice = rng.choice(g["kept"]) if g["kept"] else None
        else:
            rng.shuffle(g["eligible"])  # min() keeps the first of equals: ties fall to the seeded shuffle
            choice = min(g["eligible"], key=rank, default=None)
        if choice is None:
            continue
        cut = choice.get("finish_reason") == "length"
        counts.update([f"selected_{choice['_type'] or 'untyped'}"] + ["selected_truncated"] * cut)
        why = {"strategy": cfg.strategy, "seed": cfg.seed, "slot": choice.get("slot"), "key": choice.get("key"),
               "teacher_model": choice.get("teacher_model") or choice.get("model"), "candidates": len(g["kept"])}
        if cfg.strategy == "best":
            why.update(eligible=len(g["eligible"]), refusal_label=choice["refusal"]["label"], unsafe=choice["_unsafe"],
                       p_unsafe=choice["_p_unsafe"], reward=(choice.get("reward") or {}).get("reward"))
        rows.append({**g["prompt"], "response": choice["text"], **({"truncated": True} if cut else {}),
                     "selection": why})
    counts["selected_total"] = len(rows)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    summary = {"config": dataclasses.asdict(cfg), "counts": dict(counts), "judges": judge_ids or "none (random)",
               "refusal": "full_refusal or partial_refusal" if cfg.partial_is_refusal else "full_refusal only",
               "truncation": "kept, marked truncated: true: no end-of-turn token may be trained after the cut"
               if cfg.keep_truncated else "finish_reason=length dropped",
               "decontamination": {"ngram": cfg.ngram, "threshold": cfg.near_threshold, "min_words": decontam.MIN_WORDS,
                                   "dropped": contaminated},
               **provenance({"input": cfg.input, **{f"eval_file_{i}": p for i, p in enumerate(cfg.eval_files)}},
                            world_size=1, seed=cfg.seed, device=judge_device(cfg))}
    write_json(sibling(out, ".summary.json"), summary)
    report(f"select ({cfg.strategy}) -> {out}", counts, f"judges: {summary['judges']}; refusal = {summary['refusal']}\n"
           f"  truncation: {summary['truncation']}")
    return summary


def judge_device(cfg: JudgeConfig) -> str:
    """Where the local judges ran, for provenance: none when every judge is a pure function or served."""
    if getattr(cfg, "reward_model", None) or (cfg.safety_judge == "llamaguard" and not cfg.safety_base_url):
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "none"


def report(title: str, counts: Counter, extra: str):
    """The counts on stderr, one line per stage in pipeline order (a count's stage is its first word)."""
    stages = {}
    for k, v in counts.items():
        stages.setdefault(k.split("_")[0], []).append(f"{k.split('_', 1)[1]}={v}")
    print(f"{title}\n" + "".join(f"  {s}: {', '.join(v)}\n" for s, v in stages.items()) + f"  {extra}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# pairs: POROver's preference pairs (Algorithm 1, porover/pairs.py)

@dataclass
class PairsConfig(JudgeConfig):
    """Preference pairs (SPEC §1 step 3): the student's own refusals of seemingly toxic prompts against the
    teacher's compliant answers, plus optional safety anchors on toxic prompts; the rule is in porover/pairs.py.
    Both inputs are generate's output on the same prompts, typed seemingly_toxic or toxic (general is skipped):
        student: generate --backend local --teacher_model runs/sft/final --n 4 --temperature 1.0
        teacher: generate --teacher_model gpt-4o --n 4
    Out: preference JSONL for train_pref.py, in id order, each pair with why it was built under "pair"."""
    student: str | None = None  # the student's samples (generate's output); slots 0..k_student-1 are read
    teacher: str | None = None  # the teacher's candidates (generate's output)
    output: str | None = None  # preference JSONL; <stem>.summary.json and <stem>.judge_cache.jsonl go next to it
    k_student: int = 4  # K: student samples per prompt for the refusal fraction
    tau_refusal: float = 0.5  # overrefused when at least this share of the K samples are refusals
    tau_safe: float = 0.5  # chosen needs safety_score = 1 - p_unsafe >= tau_safe (needs --safety_judge llamaguard)
    anchor_ratio: float = 0.0  # safety-anchor pairs on toxic prompts per overrefusal pair


def resolve_pairs(cfg: PairsConfig) -> PairsConfig:
    cfg = with_tuple_eval_files(cfg)
    e = judge_errors(cfg, ("student", "teacher", "output"), judged=True)
    if cfg.safety_judge == "proxy":
        e.append("--safety_judge proxy scores refusals, which the pairs contrast: use none or llamaguard")
    if cfg.tau_safe != PairsConfig.tau_safe and cfg.safety_judge != "llamaguard":
        e.append("--tau_safe needs --safety_judge llamaguard")
    if cfg.k_student < 1:
        e.append("--k_student must be at least 1")
    if not 0 < cfg.tau_refusal <= 1 or not 0 <= cfg.tau_safe <= 1 or cfg.anchor_ratio < 0:
        e.append("--tau_refusal must be in (0, 1], --tau_safe in [0, 1] and --anchor_ratio at least 0")
    if e:
        raise ValueError("invalid config: " + "; ".join(e))
    return cfg


def pair_row(g: dict, pair: dict, kind: str, cfg: PairsConfig) -> dict:
    """The prompt record, chosen and rejected, and under "pair" why: kind (overrefusal or anchor), slots, judges."""
    chosen, rejected = pair["chosen"], pair["rejected"]
    why = {"kind": kind, "seed": cfg.seed, "chosen_slot": chosen.get("slot"), "rejected_slot": rejected.get("slot"),
           "teacher_model": chosen.get("teacher_model") or chosen.get("model"),
           "student_model": rejected.get("teacher_model") or rejected.get("model"),
           # An anchor is chosen by the safety judge: its refusal judgement may have failed (null).
           "chosen_label": (chosen["refusal"] or {}).get("label"),
           "rejected_label": (rejected["refusal"] or {}).get("label"),
           "chosen_p_unsafe": chosen["_p_unsafe"], "rejected_p_unsafe": rejected["_p_unsafe"]}
    if kind == "overrefusal":
        why.update(refusal_fraction=pair["refusal_fraction"], k_student=cfg.k_student, tau_refusal=cfg.tau_refusal)
    return {**g["prompt"], "chosen": chosen["text"], "rejected": rejected["text"], "pair": why}


def pairs(cfg: PairsConfig) -> dict:
    from porover import pairs as algorithm
    cfg = resolve_pairs(cfg)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    student, teacher = read_candidates(cfg.student), read_candidates(cfg.teacher)
    counts = Counter({"read_prompts": len(student),
                      "read_student_samples": sum(len(g["cands"]) for g in student.values()),
                      "read_teacher_candidates": sum(len(g["cands"]) for g in teacher.values()),
                      "read_teacher_prompts_without_student_samples": len(teacher.keys() - student.keys())}
                     | {f"decontam_{k}": 0 for k in ("exact", "normalised", "near")})
    index = decontam.load_index(cfg.eval_files, cfg.ngram) if cfg.eval_files else None
    contaminated, todo = [], []
    for pid, g in student.items():
        kind, t = g["cands"][0]["_type"], teacher.get(pid)
        if kind not in ("seemingly_toxic", "toxic", "general"):
            raise DataError(f"{cfg.student}:{g['line']}: field 'type' must be seemingly_toxic, toxic or general, got "
                            f"{kind!r}")
        slots = [c.get("slot") for c in g["cands"]]
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
        elif index and (hit := decontam.match(decontam.prompt_text(g["messages"]), index, cfg.near_threshold)):
            counts[f"decontam_{hit['kind']}"] += 1
            contaminated.append({"id": pid, **hit})
        else:
            seen = set()  # the teacher's candidates go through select's filters; the student's samples are all read
            reasons = [drop_reason(c, seen, keep_truncated=False) for c in t["cands"]]
            counts.update(f"teacher_dropped_{r}" for r in reasons if r)
            t["kept"] = [c for c, r in zip(t["cands"], reasons) if r is None]
            todo.append((pid, kind, g, t))
    cache = JudgeCache(Path(cfg.judge_cache or sibling(out, ".judge_cache.jsonl")))
    counts["cache_torn_lines_truncated"] = cache.torn
    # The safety judge reads the student only where anchors need it: on toxic prompts.
    refusal_only = dataclasses.replace(cfg, safety_judge="none", safety_model=None, safety_base_url=None)
    for role, judge_cfg, cands in (
            ("student", refusal_only, [c for _, k, g, _ in todo if k != "toxic" for c in g["cands"]
                                       if c["slot"] < cfg.k_student and algorithm.usable(c)]),
            ("student", cfg, [c for _, k, g, _ in todo if k == "toxic" for c in g["cands"] if algorithm.usable(c)]),
            ("teacher", cfg, [c for *_, t in todo for c in t["kept"]])):
        judged = Counter()
        judge_ids = run_judges(judge_cfg, cands, cache, judged)
        counts.update({f"{role}_{k}": v for k, v in judged.items()})
    rows, anchors, safety = [], [], cfg.safety_judge == "llamaguard"
    for pid, kind, g, t in todo:
        rng = random.Random(f"{cfg.seed}:{pid}")  # per prompt: adding or removing prompts changes no other pair
        if kind == "seemingly_toxic":
            pair, why = algorithm.overrefusal_pair(g["cands"], t["kept"], cfg.k_student, cfg.tau_refusal, cfg.tau_safe,
                                                   safety, rng)
        else:
            pair, why = algorithm.anchor_pair(g["cands"], t["kept"], cfg.tau_safe, safety, rng)
        if pair and pair["chosen"]["text"].strip() == pair["rejected"]["text"].strip():
            pair, why = None, "chosen_equals_rejected"  # the judges disagreed with themselves: teaches nothing
        stage = "overrefusal" if kind == "seemingly_toxic" else "anchor"
        counts[f"{stage}_{why}"] += 1
        if pair:
            (rows if stage == "overrefusal" else anchors).append((pid, pair_row(g, pair, stage, cfg)))
    picked = algorithm.take_anchors(anchors, len(rows), cfg.anchor_ratio, cfg.seed)
    counts.update(pairs_overrefusal=len(rows), pairs_anchor=len(picked),
                  pairs_anchor_short=algorithm.anchors_wanted(len(rows), cfg.anchor_ratio) - len(picked))
    if not safety:
        counts["pairs_chosen_safety_filter_skipped_no_judge"] = len(rows) + len(picked)
    rows = [r for _, r in sorted(rows + picked, key=lambda x: x[0])]
    counts["pairs_total"] = len(rows)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    summary = {"config": dataclasses.asdict(cfg), "counts": dict(counts), "judges": judge_ids,
               "refusal": "full_refusal or partial_refusal" if cfg.partial_is_refusal else "full_refusal only",
               "safety": "chosen: not unsafe and 1 - p_unsafe >= tau_safe" if safety else
               "no safety judge: the tau_safe filter is skipped (counted); anchors use refusal as the safe answer",
               "decontamination": {"ngram": cfg.ngram, "threshold": cfg.near_threshold, "min_words": decontam.MIN_WORDS,
                                   "dropped": contaminated},
               **provenance({"student": cfg.student, "teacher": cfg.teacher,
                             **{f"eval_file_{i}": p for i, p in enumerate(cfg.eval_files)}},
                            world_size=1, seed=cfg.seed, device=judge_device(cfg))}
    write_json(sibling(out, ".summary.json"), summary)
    report(f"pairs -> {out}", counts,
           f"judges: {judge_ids}; refusal = {summary['refusal']}\n  safety: {summary['safety']}")
    return summary


def parse_judged(cls, argv: list[str]):
    """The config parser, plus --eval_files taking several paths and repeatable."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--eval_files", nargs="+", action="extend", default=[])
    known, rest = p.parse_known_args(argv)
    return dataclasses.replace(parse(cls, rest), eval_files=tuple(known.eval_files))


COMMANDS = {"generate": (GenerateConfig, generate), "select": (SelectConfig, select), "pairs": (PairsConfig, pairs)}


def main(cfg):
    return next(fn for cls, fn in COMMANDS.values() if isinstance(cfg, cls))(cfg)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python overgen.py {{{'|'.join(COMMANDS)}}} [--flags]")
    try:
        cls = COMMANDS[sys.argv[1]][0]
        main(parse_judged(cls, sys.argv[2:]) if issubclass(cls, JudgeConfig) else parse(cls, sys.argv[2:]))
    except FatalAPIError as e:
        sys.exit(f"overgen: stopped: {e}")
