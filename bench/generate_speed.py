"""Local generation speed on the embedded model: evaluate.py's batched path vs a plain batched model.generate
vs one prompt at a time (issue 6: porover within 10% of plain batched generate).

    OMP_NUM_THREADS=1 .venv/bin/python bench/generate_speed.py [--prompts 32] [--max_new_tokens 64] [--repeats 3]

(a) `evaluate.py generate` in-process (benchmark loading, chat template, left padding, model.generate, decoding,
    keyed JSONL records flushed per item), one batch of all prompts, the model loaded once beforehand;
(b) the same prompts through one plain `tokenizer(..., padding=True)` + `model.generate` call;
(c) plain `model.generate` one prompt at a time (run once: it is the slow one).
Greedy, stopping at <|im_end|>; both batched paths must produce the same text, which is checked. Batched
timings: --repeats runs each, interleaved so that load from other processes hits both alike; ratios are given
on the median and on the best run.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
from porover import benchmarks, chat, generation, models  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = evaluate.GenerateConfig(model=models.EMBEDDED, max_new_tokens=args.max_new_tokens, batch_size=args.prompts)
    loaded = generation.load(cfg.model, device=device)
    model, tok, stop_ids = loaded
    generation.load = lambda *a, **kw: loaded  # (a) times generation, not loading
    rows = benchmarks.load_all("demo")[:args.prompts]
    texts = [chat.render(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    tmp = Path(tempfile.mkdtemp())
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def porover():
        out = tmp / "out.jsonl"
        out.unlink(missing_ok=True)
        evaluate.generate(evaluate.GenerateConfig(**{**vars(cfg), "input": str(prompts), "output": str(out)}))
        return [r["response"] for r in map(json.loads, out.read_text().splitlines())]

    @torch.no_grad()
    def plain(batch):
        enc = tok(batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                             pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
        return [tok.decode([t for t in row if t not in stop_ids], skip_special_tokens=True) for row in out.tolist()]

    def timed(fn):
        t0 = time.perf_counter()
        result = fn()
        return time.perf_counter() - t0, result

    plain(texts[:2])  # warm-up
    times = {"porover": [], "plain": []}
    for _ in range(args.repeats):
        for name, fn in (("porover", porover), ("plain", lambda: plain(texts))):
            t, out = timed(fn)
            times[name].append(t)
            if name == "porover":
                a = out
            else:
                b = out
    single_t, single = timed(lambda: [plain([t])[0] for t in texts])
    assert a == b, "evaluate.py and plain generate disagree"
    mismatch = sum(x != y for x, y in zip(a, single))
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tok = sum(len(tok(x, add_special_tokens=False).input_ids) for x in a)
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "prompts": len(texts),
                      "max_new_tokens": args.max_new_tokens, "response_tokens": n_tok,
                      "seconds_median": {"porover_batched": round(med["porover"], 2),
                                         "plain_batched": round(med["plain"], 2), "one_at_a_time": round(single_t, 2)},
                      "all_runs": {k: [round(x, 2) for x in v] for k, v in times.items()},
                      "porover_over_plain": {"median": round(med["porover"] / med["plain"], 3),
                                             "best": round(best["porover"] / best["plain"], 3)},
                      "one_at_a_time_over_plain": round(single_t / med["plain"], 2),
                      "one_at_a_time_over_porover": round(single_t / med["porover"], 2),
                      "batched_vs_single_text_mismatches": mismatch}, indent=2))


if __name__ == "__main__":
    main()
