"""Sampling n completions per prompt from a served model (any OpenAI-compatible endpoint) or a local one, one
flushed record per (prompt, sample slot) as soon as it finishes: what overgen.py generate runs.

A job is (prompt record, messages, [(slot, key)] still to do). Records go to a porover.store.Store keyed by
"key" (a hash of everything that decides the completion, never the API key); failures to a second Store next to
it, with their class, so a rerun retries what the user asks for. The `Sink` keeps counts, tokens and the cost
estimate, and draws the progress bar.
"""
import json
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from porover import benchmarks
from porover.client import Client, FatalAPIError, estimate_tokens, gather_cancelling
from porover.config import provenance
from porover.data import DataError, prompt_messages, read_jsonl
from porover.store import Store, key_of, write_json

# US$ per million (input, output) tokens: OpenAI list prices as of 2025, for the running estimate only.
# Override with --price_table (a JSON file {"model": [input, output]}); the longest matching prefix wins.
PRICES = {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "gpt-4.1": (2.00, 8.00),
          "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40), "gpt-3.5-turbo": (0.50, 1.50)}
# Fields generate adds to a prompt record; a prompt record that already has one is an error.
RECORD_FIELDS = ("slot", "key", "text", "finish_reason", "refusal", "usage", "request_n", "model", "seed", "status",
                 "attempts", "latency", "host", "gen_model", "prefill")
ESTIMATE_LABEL = "estimate: prompt tokens by the chars/4 heuristic, completion tokens at the --max_new_tokens bound"
# A fatal error (a bad key, no quota) says nothing about the item: "transient" retries it too.
RETRY = {"all": {"transient", "fatal", "permanent"}, "transient": {"transient", "fatal"}, "none": set()}


def slot_key(messages: list[dict], host: str, cfg, slot: int) -> str:
    """sha256 of what decides a completion; the seed is derived from it, so it is not an input."""
    return key_of({"messages": messages, "system_prompt": cfg.system_prompt, "prefill": cfg.prefill, "host": host,
                   "model": cfg.model,
                   "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens, "slot": slot})


def seed_of(key: str) -> int:
    return int(key[:8], 16)  # distinct per slot, and the same on every rerun


def plan(prompts: list, host: str, cfg, done: Store, errors: Store) -> tuple[list, Counter]:
    """Jobs (prompt record, messages, [(slot, key)] still to do) after what earlier runs finished or failed."""
    counts = Counter(prompts=len(prompts), slots=len(prompts) * cfg.n, finished_before=0,
                     torn_lines_truncated=done.torn + errors.torn)
    jobs = []
    for obj, messages in prompts:
        slots = []
        for slot in range(cfg.n):
            key = slot_key(messages, host, cfg, slot)
            failed = errors.get(key)
            if done.get(key):
                counts["finished_before"] += 1
            elif failed and failed["error_class"] not in RETRY[cfg.retry_failed]:
                counts[f"not_retried_{failed['error_class']}"] += 1
            else:
                slots.append((slot, key))
        if slots:
            jobs.append((obj, messages, slots))
    counts["todo"] = sum(len(j[2]) for j in jobs)
    return jobs, counts


def read_prompts(cfg) -> list[tuple[dict, list[dict]]]:
    """(prompt record, messages sent to the model) per prompt; ids must be unique strings. A .jsonl input is read as
    it is; anything else is a benchmark spec, whose records arrive typed and with ids."""
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


def price_of(model: str, table: dict) -> tuple[float, float] | None:
    match = max((k for k in table if model.startswith(k)), key=len, default=None)
    return tuple(table[match]) if match else None


def load_prices(cfg) -> dict:
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


def dry_run(cfg, jobs: list) -> dict:
    """What the run would send, without sending it (an upper bound on completion tokens)."""
    requests = []  # (choices, prompt tokens) per request
    for _, messages, slots in jobs:
        p = estimate_tokens(messages)
        requests += [(len(slots), p)] if cfg.api_n and cfg.backend == "openai" else [(1, p)] * len(slots)
    prompt, completion = sum(p for _, p in requests), sum(k for k, _ in requests) * cfg.max_new_tokens
    price = price_of(cfg.model, load_prices(cfg)) if cfg.backend == "openai" else (0.0, 0.0)
    return {"label": ESTIMATE_LABEL, "requests": len(requests), "prompt_tokens": prompt,
            "completion_tokens_max": completion,
            "cost_usd_max": None if price is None else (prompt * price[0] + completion * price[1]) / 1e6}


class Sink:
    """The append-only outputs (one flushed line per finished slot or failure), counts, tokens and cost."""

    def __init__(self, cfg, out: Store, errors: Store, total: int):
        self.cfg, self.counts, self.tokens, self.cost = cfg, Counter(), Counter(), 0.0
        self.prices = load_prices(cfg)
        self.out, self.err = out, errors
        self.bar = tqdm(total=total, desc="generate", dynamic_ncols=True)

    def record(self, obj: dict, slot: int, key: str, choice: dict, meta: dict):
        status = "filtered" if choice["finish_reason"] == "content_filter" else "ok"
        self.out.append({**obj, "slot": slot, "key": key, "text": choice["text"],
                         "finish_reason": choice["finish_reason"], "refusal": choice.get("refusal"), "status": status,
                         "gen_model": self.cfg.model, **meta})
        self.counts[status] += 1
        self.counts["finish_" + str(choice["finish_reason"])] += 1
        self.counts["api_refusal"] += bool(choice.get("refusal"))
        self.tick()

    def failure(self, obj: dict, slot: int, key: str, error_class: str, error: str, attempts: int, latency: float):
        self.err.append({"id": obj["id"], "slot": slot, "key": key, "status": "failed", "error_class": error_class,
                         "error": error, "attempts": attempts, "latency": round(latency, 3), "time": time.time()})
        self.counts[f"failed_{error_class}"] += 1
        self.tick()

    def usage(self, model: str | None, usage: dict | None):
        if not usage:
            return
        pin, pout = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        self.tokens.update(prompt=pin, completion=pout)
        price = price_of(model or self.cfg.model, self.prices)
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


async def run_openai(cfg, jobs: list, sink: Sink):
    """Every job (prompt record, messages, missing [(slot, key)]) through the client, `concurrency` at a time."""
    client = Client(cfg.base_url, cfg.api_key_env, cfg.concurrency, cfg.rpm, cfg.tpm, cfg.timeout, cfg.max_attempts,
                    cfg.backoff, cfg.backoff_max)
    use_n = cfg.api_n
    meta = {"host": client.host}

    async def request(obj, messages, slots):
        """One request for len(slots) choices; returns how many slots it settled (written or failed)."""
        nonlocal use_n
        try:
            res = await client.chat(messages, model=cfg.model, max_tokens=cfg.max_new_tokens,
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


def run_local(cfg, jobs: list, sink: Sink):
    """A transformers model, batches of `batch_size` (prompt, slot) rows, sampled with a seed taken from the batch's
    keys (the same batch gives the same samples on every machine and rerun). With --prefill the answer's first
    tokens are given: the record's text is the prefill and what the model wrote after it."""
    from porover import chat, generation
    model, tokenizer, stop_ids = generation.load(cfg.model, cfg.chat_template)
    prefill = tokenizer(cfg.prefill, add_special_tokens=False).input_ids if cfg.prefill else []
    rows = [(obj, slot, key, chat.encode_prompt(tokenizer, messages) + prefill) for obj, messages, slots in jobs
            for slot, key in slots]
    for b in range(0, len(rows), cfg.batch_size):
        batch = rows[b:b + cfg.batch_size]
        seed = generation.batch_seed([r[2] for r in batch])
        t0 = time.monotonic()
        answers = generation.answer_batch(model, tokenizer, stop_ids, [r[3] for r in batch], cfg.max_new_tokens,
                                          cfg.temperature, cfg.top_p, seed)
        latency = round(time.monotonic() - t0, 3)
        sink.counts["requests"] += 1
        for (obj, slot, key, ids), a in zip(batch, answers):
            usage = {"prompt_tokens": len(ids), "completion_tokens": a["n_tokens"] + (a["finish_reason"] == "stop")}
            sink.tokens.update(prompt=len(ids), completion=usage["completion_tokens"])
            a = {**a, "text": (cfg.prefill or "") + a["text"]}
            sink.record(obj, slot, key, a, {"usage": usage, "request_n": 1, "model": cfg.model, "seed": seed,
                                            "attempts": 1, "latency": latency, "host": "local",
                                            "prefill": cfg.prefill})


def write_summary(cfg, path: Path, summary: dict, counts: Counter, sink):
    """tokens and cost_usd are this run's; the *_all_runs totals carry over every run into this output."""
    before = json.loads(path.read_text()) if path.exists() else {}
    tokens_all, cost_all = Counter(before.get("tokens_all_runs", {})), before.get("cost_usd_all_runs", 0.0)
    if sink is not None:
        sink.close()
        counts.update(sink.counts)
        tokens_all.update(sink.tokens)
        cost_all += sink.cost
        summary.update(tokens=dict(sink.tokens), cost_usd=round(sink.cost, 6),
                       price_table=cfg.price_table or "built-in list prices (porover.sampling.PRICES)")
    summary.update(tokens_all_runs=dict(tokens_all), cost_usd_all_runs=round(cost_all, 6), counts=dict(counts))
    summary.update(provenance({"input": cfg.input, "price_table": cfg.price_table}, world_size=1,
                              device=cfg.backend, seed="per key (porover.sampling.seed_of)"))
    write_json(path, summary)
