"""SFT throughput and peak memory: porover's train_sft.py against a plain transformers loop.

    python bench/sft_throughput.py [--steps 10] [--repeats 3]

Embedded SmolLM2-135M, batch 4, max_length 256, fp32 on CPU, the seed set's batches in the same order for
both (`--full_length`: the seed answers repeated so that every sequence fills the 256 tokens). Each measurement runs in its own process (peak RSS from ru_maxrss only grows); the two are
interleaved and the median of the repeats reported. Tokens/s counts non-pad tokens per optimizer-step
wall-second, the first 2 steps (warm-up) excluded.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def full_length_data(path):
    """Seed prompts with their answers repeated to overflow max_length: every sequence is 256 tokens."""
    rows = [json.loads(line) for line in open("data/demo/sft_seed.jsonl")]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "response": " ".join([r["response"]] * 4)}) + "\n")
    return path


def plain(steps, data):
    import torch
    from porover import chat, models
    from porover.data import read_sft
    from porover.training import epoch_order

    tok = models.load_tokenizer("smollm2-135m")
    eot = chat.prepare_tokenizer(tok)
    items, _ = chat.tokenize_sft(tok, eot, read_sft(data)[0], 256)
    torch.manual_seed(1337)
    model = models.load_model("smollm2-135m").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    order = epoch_order([len(i["input_ids"]) for i in items], 0, 1337, 4, False)
    rates = []
    for s in range(steps):
        b = chat.collate([items[i] for i in order[s * 4:s * 4 + 4]], tok.pad_token_id)
        t0 = time.perf_counter()
        labels = b["input_ids"].masked_fill(b["loss_mask"] == 0, -100)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(b["attention_mask"].sum().item() / (time.perf_counter() - t0))
    return rates


def porover(steps, data):
    import train_sft

    with tempfile.TemporaryDirectory() as out:
        train_sft.main(train_sft.Config(data=data, max_steps=steps, batch_size=4, max_length=256, out_dir=out, lr=1e-5))
        return [json.loads(r)["tokens_per_sec"] for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["plain", "porover"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full_length", action="store_true", help="every sequence 256 tokens (answers repeated)")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3: the first 2 steps are warm-up, excluded from the medians")
    if args.worker:
        data = "data/demo/sft_seed.jsonl"
        if args.full_length:
            data = full_length_data(Path(tempfile.mkdtemp()) / "long.jsonl")
        rates = {"plain": plain, "porover": porover}[args.worker](args.steps, str(data))[2:]
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps({"tokens_per_sec": statistics.median(rates), "peak_rss_gb": peak_gb}))
        return
    results = {"plain": [], "porover": []}
    for r in range(args.repeats):
        for name in results:
            cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps)]
            out = subprocess.run(cmd + ["--full_length"] * args.full_length, capture_output=True, text=True,
                                 check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"repeat {r} {name}: {results[name][-1]}", flush=True)
    med = {k: statistics.median(x["tokens_per_sec"] for x in v) for k, v in results.items()}
    mem = {k: max(x["peak_rss_gb"] for x in v) for k, v in results.items()}
    for k in results:
        print(f"{k:8s} median tokens/s {med[k]:7.1f}   peak RSS {mem[k]:.2f} GB")
    print(f"porover / plain: {med['porover'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
