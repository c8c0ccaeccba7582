"""Overgeneration (SPEC §1 steps 1-2, §7): teacher candidates for every prompt.

    python overgen.py generate --input prompts.jsonl --output runs/teacher/general.jsonl --teacher_model gpt-4o --n 4
    python overgen.py generate --backend local --input prompts.jsonl --output runs/teacher/local.jsonl --n 2

`generate` writes one record per (prompt, sample slot) to --output as soon as its request finishes, keyed
by a hash of everything that decides the completion (never the API key). A rerun skips finished keys, so a
killed run resumes without paying twice, and raising --n from 4 to 8 reuses slots 0-3. Failures go to
<output stem>.errors.jsonl with their class; counts, tokens, cost and provenance to <output stem>.summary.json.
"""
import asyncio
import dataclasses
import fcntl
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

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
    input: str | None = None  # prompts JSONL (SPEC §3)
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
    backoff_max: float | None = None
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
    """(prompt record, messages sent to the teacher) per line; ids must be unique strings."""
    prompts, seen = [], set()
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for lineno, obj in read_jsonl(cfg.input):
        if not isinstance(obj.get("id"), str):
            raise DataError(f"{cfg.input}:{lineno}: field 'id' must be a string")
        if obj["id"] in seen:
            raise DataError(f"{cfg.input}:{lineno}: field 'id': duplicate {obj['id']!r}")
        if clash := [k for k in RECORD_FIELDS if k in obj]:
            raise DataError(f"{cfg.input}:{lineno}: field {clash[0]!r} is reserved for generate's records")
        seen.add(obj["id"])
        prompts.append((obj, system + prompt_messages(obj, cfg.input, lineno)))
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
    table = json.loads(Path(cfg.price_table).read_text()) if cfg.price_table else PRICES
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
    host = "local" if cfg.backend == "local" else endpoint_host(cfg.base_url)
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
            if sink is not None:
                sink.close()
                counts.update(sink.counts)
                summary.update(tokens=dict(sink.tokens), cost_usd=round(sink.cost, 6),
                               price_table=cfg.price_table or "built-in list prices (overgen.PRICES)")
            summary["counts"] = dict(counts)
            summary.update(provenance({"input": cfg.input, "price_table": cfg.price_table}, world_size=1,
                                      device=cfg.backend, seed="per key (overgen.seed_of)"))
            write_json(sibling(out, ".summary.json"), summary)
    return summary


COMMANDS = {"generate": (GenerateConfig, generate)}


def main(cfg):
    return next(fn for cls, fn in COMMANDS.values() if isinstance(cfg, cls))(cfg)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python overgen.py {{{'|'.join(COMMANDS)}}} [--flags]  (select: not yet built)")
    try:
        main(parse(COMMANDS[sys.argv[1]][0], sys.argv[2:]))
    except FatalAPIError as e:
        sys.exit(f"overgen: stopped: {e}")
