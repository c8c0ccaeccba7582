"""Judging behind one interface: refusal (keyword, LLM) and safety (Llama Guard local or served, the offline proxy)
verdicts on a list of items, each answer cached by the judge's id (reward-model scores: porover/reward.py).

An item is a dict with "_messages" (the prompt's conversation), "_response" (the text judged) and "_type"
(general, toxic, seemingly_toxic). `run` adds the verdicts to it:
    _refusal_label  one of judges.LABELS, None when the judge failed   _refusal  bool under the convention, or None
    _refusal_raw    the LLM judge's raw reply                          _safety   the safety judge's full answer
    _unsafe         True/False/None                                    _p_unsafe Llama Guard's soft score, or None
Every judge answer is stored in a keyed append-only cache (porover.store.Store) under a key made of the judge's
id (model, template version, endpoint, reply budget) and the item's messages and response: a rerun never asks a
judge twice, and another judge or template never reuses a stale answer. Failures are not stored (asked again).
The proxy is a pure function of the refusal verdict and is recomputed.
"""
import asyncio
import functools
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from porover import judges
from porover.client import Client, endpoint_host, gather_cancelling
from porover.data import DataError, read_jsonl
from porover.store import Store, key_of


@dataclass
class JudgeConfig:
    """The judges, with the same flags in overgen.py and evaluate.py."""
    judge: Literal["keyword", "llm"] = "keyword"  # the refusal judge
    judge_model: str | None = None  # llm: the served judge's model name
    judge_template: str | None = None  # llm: a template file with {prompt} and {response}
    judge_max_tokens: int = 512  # llm: the judge's reply budget
    judge_base_url: str | None = None  # llm: the judge's endpoint (None: api.openai.com)
    judge_concurrency: int = 16  # requests in flight to a served judge
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key of a served judge; never the key itself
    partial_is_refusal: bool = True  # refusal = full_refusal or partial_refusal
    safety_judge: Literal["none", "proxy", "llamaguard"] = "none"
    safety_model: str | None = None  # llamaguard: a local model folder or hub id, or the served name
    safety_base_url: str | None = None  # llamaguard served by an OpenAI-compatible server with logprobs


def config_errors(cfg: JudgeConfig) -> list[str]:
    """A judge flag that the judges in use would ignore is an error, never a silent no-op."""
    def unused(names, why, when):
        return [f"--{k} {why}" for k in names if when and getattr(cfg, k) != getattr(JudgeConfig, k)]
    e = unused(("judge_model", "judge_template", "judge_max_tokens", "judge_base_url"), "applies to --judge llm only",
               cfg.judge != "llm")
    e += unused(("safety_model", "safety_base_url"), "applies to --safety_judge llamaguard only",
                cfg.safety_judge != "llamaguard")
    e += unused(("api_key_env", "judge_concurrency"), "applies to a served judge only",
                cfg.judge != "llm" and not cfg.safety_base_url)
    if cfg.judge == "llm" and not cfg.judge_model:
        e.append("--judge llm needs --judge_model")
    if cfg.safety_judge == "llamaguard" and not cfg.safety_model:
        e.append("--safety_judge llamaguard needs --safety_model")
    if cfg.judge_max_tokens < 1 or cfg.judge_concurrency < 1:
        e.append("--judge_max_tokens and --judge_concurrency must be at least 1")
    return e


def keyword_id() -> str:
    """The keyword judge is named by its module's hash: any edit to its patterns re-judges (free, offline)."""
    return "keyword@" + hashlib.sha256(Path(judges.__file__).read_bytes()).hexdigest()[:12]


def judge_ids(cfg: JudgeConfig) -> dict:
    """What every summary and record names the judges by; part of every cache key."""
    refusal = keyword_id() if cfg.judge == "keyword" else (
        f"llm:{cfg.judge_model}@{judges.llm_template(cfg.judge_template)[1]}|{endpoint_host(cfg.judge_base_url)}"
        f"|max_tokens={cfg.judge_max_tokens}")
    if cfg.safety_judge == "llamaguard":
        from porover.generation import identity
        where = endpoint_host(cfg.safety_base_url) if cfg.safety_base_url else identity(cfg.safety_model)
        safety = f"llamaguard:{cfg.safety_model}|{where}"
    else:
        safety = {"proxy": "proxy", "none": "none"}[cfg.safety_judge]
    return {"refusal": refusal, "safety": safety}


def cached(name: str, judge_id: str, items: list[dict], score, cache: Store, counts: Counter):
    """item["_answer"] = the cached answer, else score(todo, put), where put(item, answer, error=None) stores each
    answer as it arrives (a killed run keeps every answer it paid for); a failure (answer None) leaves its error in
    item[f"_{name}_error"]. Counted under `name`."""
    keys = {id(c): key_of(judge_id, c["_messages"], c["_response"]) for c in items}
    for c in items:
        c["_answer"], c[f"_{name}_error"] = (cache.get(keys[id(c)]) or {}).get("result"), None
    todo = [c for c in items if c["_answer"] is None]
    counts[f"{name}_cached"] += len(items) - len(todo)

    def put(c, answer, error=None):
        c["_answer"], c[f"_{name}_error"] = answer, error
        counts[f"{name}_{'failed' if answer is None else 'judged'}"] += 1
        if answer is not None:
            cache.append({"key": keys[id(c)], "judge": judge_id, "result": answer})
    if todo:
        score(todo, put)


def served(cfg: JudgeConfig, base_url: str | None, request, parse):
    """A scorer through the shared client: every request concurrently, each answer stored as it arrives."""
    def score(todo, put):
        client = Client(base_url, cfg.api_key_env, cfg.judge_concurrency)

        async def one(c):
            res = await client.chat(**request(c))
            ok = res.status == "ok"
            put(c, parse(res) if ok else None, None if ok else res.error or "failed")

        async def go():
            async with client:
                await gather_cancelling(one(c) for c in todo)
        asyncio.run(go())
    return score


@functools.cache
def load_guard(path: str, version: str):
    """(tokenizer, model) of a local Llama Guard, loaded once per process and model `version`."""
    from porover import generation, models
    device, dtype = generation.device_and_dtype()
    return models.load_tokenizer(path), models.load_model(path, dtype=dtype).to(device).eval()


def llamaguard_local(path: str):
    def score(todo, put):
        from porover.generation import identity
        tok, model = load_guard(path, identity(path))
        for c in todo:
            put(c, judges.llamaguard_score(model, tok, c["_messages"][-1]["content"], c["_response"]))
    return score


def served_llamaguard(res) -> dict:
    """A served Llama Guard's reply: the verdict, its raw text, and p_unsafe from the top log-probs (None without)."""
    top = [[{"token": t, "logprob": v} for t, v in pos["top"].items()] for pos in res.logprobs or []]
    p = judges.p_unsafe_from_top_logprobs(top or None)
    return {**judges.parse_llamaguard(res.text), "raw": res.text, "p_unsafe": p,
            "safety_score": None if p is None else 1 - p}


def refusal(cfg: JudgeConfig, items: list[dict], judge_id: str, cache: Store, counts: Counter):
    if cfg.judge == "keyword":
        score = lambda todo, put: [put(c, {"label": judges.keyword_judge(c["_response"], c["_messages"][-1]["content"])})
                                   for c in todo]  # noqa: E731
    else:
        score = served(cfg, cfg.judge_base_url, lambda c: {
            "messages": judges.llm_judge_messages(c["_messages"][-1]["content"], c["_response"], cfg.judge_template),
            "model": cfg.judge_model, "max_tokens": cfg.judge_max_tokens, "temperature": 0.0},
            lambda res: {"label": judges.parse_llm_judge(res.text), "raw": res.text})
    cached("refusal", judge_id, items, score, cache, counts)
    for c in items:
        a = c.pop("_answer") or {}
        c["_refusal_label"], c["_refusal_raw"] = a.get("label"), a.get("raw")
        c["_refusal"] = judges.is_refusal(c["_refusal_label"], cfg.partial_is_refusal) if a else None
        counts[f"label_{c['_refusal_label'] or 'judge_failed'}"] += 1


def safety(cfg: JudgeConfig, items: list[dict], judge_id: str, cache: Store, counts: Counter):
    """Llama Guard's verdict and soft score, or the proxy's (a refusal of a toxic prompt is not unsafe)."""
    if cfg.safety_judge == "proxy":
        for c in items:
            c["_answer"] = judges.proxy_safety(c["_refusal"], c["_type"] == "toxic")
    elif cfg.safety_base_url:
        cached("safety", judge_id, items, served(cfg, cfg.safety_base_url, lambda c: {
            "messages": [{"role": "user", "content": c["_messages"][-1]["content"]},
                         {"role": "assistant", "content": c["_response"]}],
            "model": cfg.safety_model, "max_tokens": 16, "temperature": 0.0, "logprobs": 5}, served_llamaguard),
            cache, counts)
    else:
        cached("safety", judge_id, items, llamaguard_local(cfg.safety_model), cache, counts)
    for c in items:
        s = c["_safety"] = c.pop("_answer")
        s = s or {}
        # A verdict line that did not parse stays None (counted by the callers), whatever the soft score says.
        c["_p_unsafe"], c["_unsafe"] = s.get("p_unsafe"), s.get("unsafe")
        if cfg.safety_judge == "llamaguard":
            counts["safety_p_unsafe_null"] += c["_p_unsafe"] is None  # a server without logprobs: counted


def run(cfg: JudgeConfig, cache: Store, counts: Counter, refusal_items: list[dict],
        safety_items: list[dict] = ()) -> dict:
    """Refusal verdicts on `refusal_items`, safety verdicts on `safety_items` (with the proxy, which reads the refusal
    verdict, those are refusal-judged too); every item gets all the fields, None where not judged. Returns the
    judges' ids."""
    ids = judge_ids(cfg)
    if cfg.safety_judge == "proxy":
        seen = {id(c) for c in refusal_items}
        refusal_items = list(refusal_items) + [c for c in safety_items if id(c) not in seen]
    for c in (*refusal_items, *safety_items):
        c.update(_refusal=None, _refusal_label=None, _refusal_raw=None, _safety=None, _p_unsafe=None, _unsafe=None)
    refusal(cfg, refusal_items, ids["refusal"], cache, counts)
    if cfg.safety_judge != "none" and safety_items:
        safety(cfg, list(safety_items), ids["safety"], cache, counts)
    return ids


def safety_score(c: dict) -> float | None:
    """The paper's safety score s in [0, 1]: Llama Guard's p(safe) normalised over its two verdict tokens, that is
    1 - p_unsafe; with the offline proxy, 1 for a refusal of a toxic prompt and 0 for a compliance. None: unscored."""
    if c["_p_unsafe"] is not None:
        return 1.0 - c["_p_unsafe"]
    if (c["_safety"] or {}).get("judge") == "proxy" and c["_unsafe"] is not None:
        return 0.0 if c["_unsafe"] else 1.0
    return None


def device(cfg: JudgeConfig) -> str:
    """Where the local judges ran, for provenance: none when every judge is a pure function or served."""
    if getattr(cfg, "reward_model", None) or (cfg.safety_judge == "llamaguard" and not cfg.safety_base_url):
        from porover.generation import device_and_dtype
        return device_and_dtype()[0].type
    return "none"


def read_judged(path, partial_is_refusal: bool) -> tuple[list[dict], Counter, dict]:
    """Judged records with `refusal` re-derived from `refusal_label` under the chosen convention; the counts of
    failed and unparseable judgements; which judges wrote them."""
    rows, counts, used = [], Counter(), {"refusal": set(), "safety": set()}
    for lineno, rec in read_jsonl(path):
        for field in ("id", "type", "benchmark") + (("unsafe",) if rec.get("type") == "toxic" else ("refusal_label",)):
            if field not in rec:
                hint = "run judge --safety_judge proxy|llamaguard" if field == "unsafe" else "run judge"
                raise DataError(f"{path}:{lineno}: missing field {field!r} ({hint})")
        label = rec.get("refusal_label")
        if label is not None and label not in judges.LABELS:
            raise DataError(f"{path}:{lineno}: field 'refusal_label' {label!r} is not one of {judges.LABELS}")
        if rec.get("unsafe") not in (True, False, None):
            raise DataError(f"{path}:{lineno}: field 'unsafe' must be true, false or null, got {rec['unsafe']!r}")
        rec["refusal"] = None if label is None else judges.is_refusal(label, partial_is_refusal)
        if rec["type"] == "toxic" and rec.get("safety_judge") == "proxy":
            rec["unsafe"] = judges.proxy_safety(rec["refusal"], True)["unsafe"]  # refused = not unsafe, same rule as U
        counts["refusal_failed"] += rec.get("refusal_status") == "failed"
        counts["refusal_unparseable"] += label == "unparseable"
        if rec["type"] == "toxic":
            counts["safety_failed"] += rec.get("safety_status") == "failed"
            counts["safety_null"] += rec["unsafe"] is None
            used["safety"].add(rec.get("safety_judge"))
        used["refusal"].add(rec.get("refusal_judge"))
        rows.append(rec)
    return rows, counts, {k: sorted(map(str, v)) for k, v in used.items()}
