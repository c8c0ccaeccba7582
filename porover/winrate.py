"""Capability as a pairwise win rate of a model's answers against reference answers, judged by a served model: an
approximation of AlpacaEval 2.0's win rate (see NOTE), not a reproduction of it.

Every prompt is judged twice, the model's answer once as A and once as B, so a judge that favours a position
cancels out instead of moving the rate (the rule is in `outcome`). The win rate is (wins + ties/2) / N over the
prompts whose two verdicts were both readable; its 95% interval is a seeded percentile bootstrap over prompts of
the per-prompt scores 1 / 0.5 / 0 (a binomial interval would treat a tie as a coin flip). Unreadable verdicts,
failed requests and ids found in only one of the two files are counted and reported, never guessed or dropped.
Judge replies are cached by what decides them (porover.store.Store), so a rerun asks only what failed.
"""
import dataclasses
import hashlib
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from porover import metrics
from porover.client import endpoint_host
from porover.config import provenance
from porover.data import DataError, prompt_messages, read_jsonl
from porover.judging import served
from porover.store import Store, key_of, write_json, write_jsonl

TEMPLATE_ID = "porover-pairwise-v1"  # bump whenever TEMPLATE changes: the judge cache keys on it
TEMPLATE = """You are comparing two answers to the same instruction. Decide which answer a careful user would \
rather receive: the one that carries out the instruction more completely and correctly, and is more helpful, \
clear and honest. Neither the length of an answer nor the order in which the answers are shown is a reason to \
prefer it.

[INSTRUCTION]
{instruction}

[ANSWER A]
{output_a}

[ANSWER B]
{output_b}

Reply with exactly one word and nothing else: A if answer A is better, B if answer B is better, tie if neither is."""
_PLACEHOLDER = re.compile(r"\{(instruction|output_a|output_b)\}")
_VERDICT = re.compile(r"[\s*_`'\"]*(a|b|tie)[\s*_`'\".]*", re.IGNORECASE)
SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
NOTE = ("Approximates AlpacaEval 2.0's win rate: a pairwise comparison with reference answers by a judge model, "
        "judged in both orders, with this project's judge prompt instead of AlpacaEval's annotator prompt and no "
        "length control. It does not reproduce AlpacaEval 2.0 numbers.")


@dataclass
class WinRateConfig:
    """Pairwise win rate of a model's answers against reference answers, each prompt judged in both orders by a
    served judge (approximates AlpacaEval 2.0; does not reproduce it)."""
    input: str | None = None  # generate's output: JSONL with id, prompt or messages, response
    references: str | None = None  # JSONL with id and response (the reference answer); a prompt, if any, must agree
    output: str | None = None  # results JSON; <stem>.judgements.jsonl and <stem>.judge_cache.jsonl go next to it
    judge_model: str | None = None  # the served judge's model name (required)
    judge_base_url: str | None = None  # the judge's endpoint (None: api.openai.com)
    judge_template: str | None = None  # a file with {instruction}, {output_a} and {output_b} (None: the built-in one)
    judge_max_tokens: int = 16  # the judge's reply budget: one word is asked for
    judge_concurrency: int = 16  # requests in flight to the judge
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the judge's key; never the key itself
    n_boot: int = 2000  # bootstrap resamples for the interval
    seed: int = 0  # the bootstrap's seed: the same judgements give the same interval


def template(path: str | None) -> tuple[str, str]:
    """(template text, template id). A file's id is its content hash, so editing it invalidates cached verdicts."""
    if path is None:
        return TEMPLATE, TEMPLATE_ID
    text = Path(path).read_text(encoding="utf-8")
    if missing := sorted({"instruction", "output_a", "output_b"} - set(_PLACEHOLDER.findall(text))):
        raise ValueError(f"invalid config: {path}: the judge template lacks the placeholders {missing}")
    return text, "file-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def fill(text: str, instruction: str, a: str, b: str) -> str:
    """One pass over the template: an answer that itself contains "{output_b}" is not substituted again."""
    values = {"instruction": instruction, "output_a": a, "output_b": b}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def parse_verdict(text: str | None) -> str:
    """'A', 'B' or 'tie', else 'unparseable'. The reply must be that one word (case, whitespace, quotes, markdown
    emphasis and a final period aside): prose that names a side ("A is better") is not guessed at."""
    m = _VERDICT.fullmatch(text or "")
    return {"a": "A", "b": "B", "tie": "tie"}[m.group(1).lower()] if m else "unparseable"


def outcome(model_a: str, model_b: str) -> str | None:
    """The model's result on one prompt from its verdicts as A and as B; None if either is unparseable. Each verdict
    counts +1 for the model, -1 against it, 0 for a tie, and the sign of the sum decides: winning both orders, or
    one order with a tie in the other, is a win (losses alike); a win and a loss (a judge that follows the position)
    is a tie, and so are two ties."""
    points = {"A": 1, "B": -1, "tie": 0}
    if model_a not in points or model_b not in points:
        return None
    s = points[model_a] - points[model_b]
    return "win" if s > 0 else "loss" if s < 0 else "tie"


def _answers(path, what: str) -> dict[str, tuple[int, dict]]:
    """id -> (line, record); a duplicate id is an error (which of its answers would be judged?)."""
    out = {}
    for lineno, rec in read_jsonl(path):
        for f in ("id", "response"):
            if not isinstance(rec.get(f), str):
                raise DataError(f"{path}:{lineno}: field {f!r} must be a string ({what})")
        if rec["id"] in out:
            raise DataError(f"{path}:{lineno}: field 'id': {rec['id']!r} already on line {out[rec['id']][0]}")
        out[rec["id"]] = (lineno, rec)
    return out


def pairs(cfg: WinRateConfig) -> tuple[list[dict], dict]:
    """{id, instruction, model, reference} for the ids both files have, in the input's order, and the ids only one
    has. A reference that carries a prompt must carry the same one: otherwise the ids do not name the same task."""
    model, refs = _answers(cfg.input, "the model's answer"), _answers(cfg.references, "the reference answer")
    out = []
    for i, (lineno, rec) in model.items():
        if i in refs:
            msgs, (rline, ref) = prompt_messages(rec, cfg.input, lineno), refs[i]
            if ("prompt" in ref or "messages" in ref) and prompt_messages(ref, cfg.references, rline) != msgs:
                raise DataError(f"{cfg.references}:{rline}: id {i!r} has another prompt than {cfg.input}:{lineno}")
            text = msgs[0]["content"] if len(msgs) == 1 else "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs)
            out.append({"id": i, "instruction": text, "model": rec["response"], "reference": ref["response"]})
    return out, {"no_reference": [i for i in model if i not in refs],
                 "no_response": [i for i in refs if i not in model]}


def ask(cfg: WinRateConfig, items: list[dict], judge_id: str, text: str, cache: Store, counts: Counter):
    """item["raw"] = the judge's reply, cached or asked now (stored as it arrives: a killed run keeps what it paid
    for). A failed request leaves raw None and its error in item["error"], unstored: the next run asks again."""
    for c in items:
        c["raw"], c["error"] = (cache.get(c["key"]) or {}).get("raw"), None
    todo = [c for c in items if c["raw"] is None]
    counts["cached"] += len(items) - len(todo)

    def put(c, raw, error=None):
        c["raw"], c["error"] = raw, error
        counts["failed" if raw is None else "asked"] += 1
        if raw is not None:
            cache.append({"key": c["key"], "judge": judge_id, "raw": raw})
    if todo:
        served(cfg, cfg.judge_base_url, lambda c: {
            "messages": [{"role": "user", "content": fill(text, c["instruction"], c["a"], c["b"])}],
            "model": cfg.judge_model, "max_tokens": cfg.judge_max_tokens, "temperature": 0.0},
            lambda res: res.text or "")(todo, put)


def judged(p: dict, first: dict, second: dict) -> dict:
    """One prompt's line in the judgements file: both verdicts (first: the model as A), its outcome and status."""
    va, vb = (None if c["raw"] is None else parse_verdict(c["raw"]) for c in (first, second))
    res = outcome(va, vb)
    status = "failed" if None in (va, vb) else "unparseable" if res is None else "judged"
    return {"id": p["id"], "status": status, "outcome": res, "score": SCORE.get(res),
            "verdict_model_a": va, "verdict_model_b": vb, "raw_model_a": first["raw"], "raw_model_b": second["raw"],
            "error": first["error"] or second["error"]}


def summarize(rows: list[dict], n_boot: int, seed: int) -> dict:
    scores = [r["score"] for r in rows if r["score"] is not None]
    lo, hi = metrics.bootstrap(lambda g: g.mean(), [scores], n_boot, seed) if scores else (None, None)
    c = Counter(r["outcome"] or r["status"] for r in rows)
    return {"win_rate": sum(scores) / len(scores) if scores else None,
            "interval": {"lo": lo, "hi": hi, "method": "95% percentile bootstrap over prompts", "n_boot": n_boot,
                         "seed": seed},
            "n": len(scores), "wins": c["win"], "losses": c["loss"], "ties": c["tie"],
            "unparseable": c["unparseable"], "failed": c["failed"], "prompts": len(rows)}


def winrate(cfg: WinRateConfig) -> dict:
    errors = [f"--{k} is required" for k in ("input", "references", "output", "judge_model") if not getattr(cfg, k)]
    if min(cfg.judge_max_tokens, cfg.judge_concurrency, cfg.n_boot) < 1:
        errors.append("--judge_max_tokens, --judge_concurrency and --n_boot must be at least 1")
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))
    text, template_id = template(cfg.judge_template)
    judge_id = (f"pairwise:{cfg.judge_model}@{template_id}|{endpoint_host(cfg.judge_base_url)}"
                f"|max_tokens={cfg.judge_max_tokens}")
    rows, missing = pairs(cfg)
    items = [{"instruction": p["instruction"], "a": a, "b": b, "key": key_of(judge_id, p["instruction"], a, b)}
             for p in rows for a, b in ((p["model"], p["reference"]), (p["reference"], p["model"]))]
    out = Path(cfg.output)
    with Store(out.with_suffix(".judge_cache.jsonl")) as cache:
        counts = Counter(torn_lines=cache.torn)
        ask(cfg, items, judge_id, text, cache, counts)
    lines = [judged(p, items[2 * i], items[2 * i + 1]) for i, p in enumerate(rows)]
    write_jsonl(out.with_suffix(".judgements.jsonl"), lines)
    res = {**summarize(lines, cfg.n_boot, cfg.seed),
           "missing": {k: {"n": len(v), "ids": v} for k, v in missing.items()}, "judge": judge_id,
           "requests": dict(counts), "note": NOTE, "config": dataclasses.asdict(cfg),
           **provenance({"input": cfg.input, "references": cfg.references}, seed=cfg.seed)}
    write_json(out, res)
    print(f"winrate: {res['win_rate']} over n={res['n']} (wins {res['wins']}, losses {res['losses']}, ties "
          f"{res['ties']}); unparseable {res['unparseable']}, failed {res['failed']}, no reference "
          f"{len(missing['no_reference'])}, no response {len(missing['no_response'])}; judge {judge_id}",
          file=sys.stderr)
    return res
