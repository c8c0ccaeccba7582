"""GPU check: SFT and DPO throughput, MFU and peak memory for a Llama-3.2-1B-shaped model, FSDP2, bf16.

    python bench/gpu_check.py             # on one CUDA device: d=2048, 16 layers, 32/8 heads, d_ff=8192,
                                          # vocab 128256, tied; sequence length 2048; 20 steps each
    python bench/gpu_check.py --tiny      # the same path on CPU with a tiny model (a smoke test)
    python bench/gpu_check.py --tokenizer DIR   # where the embedded model is not installed (a bare GPU box)

Random initialisation (no download); the embedded SmolLM2 tokenizer writes the data, whose ids all fall
inside the larger vocabulary. MFU counts 6N FLOPs per trained token, +2N with the online reference
(porover.parallel.flops_per_token), against 989 TFLOP/s for an H100/H200. Four runs: SFT (which also
writes a DCP checkpoint and the export), DPO with the online reference, SFT with --compile, and a few DPO
steps with --ref_offload (CUDA only). Reported per run: median tokens/s and MFU over steps 5.., peak GPU
memory, the first loss (DPO's is ln 2 = 0.6931 when policy = reference) and wall time; a run that fails
prints its traceback and the next one still runs.
"""
import argparse
import json
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import train_pref  # noqa: E402
import train_sft  # noqa: E402
from porover import dist, models  # noqa: E402

SHAPES = {"1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, seq=2048, steps=20, batch=4, pair_batch=2),
          "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=49152, seq=128, steps=6, batch=2, pair_batch=1)}


def text_of(tokenizer, n_tokens, rng):
    words = sorted(w for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha())  # get_vocab: any order
    return " ".join(rng.choice(words)[1:] for _ in range(n_tokens))


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def summary(name, run_dir, seconds):
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tail = rows[4:] or rows
    out = {"run": name, "steps": len(rows), "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in tail),
           "mfu": statistics.median(r["mfu"] for r in tail) if "mfu" in rows[0] else None,
           "step_time": statistics.median(r["step_time"] for r in tail), "peak_memory_gb": peak_memory_gb(),
           "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "wall_s": seconds}
    print("RESULT " + json.dumps(out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokenizer", default=models.EMBEDDED, help="a tokenizer directory, or the embedded model's")
    args = ap.parse_args()
    shape = dict(SHAPES["tiny" if args.tiny else "1b"])
    seq, steps, batch, pair_batch = (shape.pop(k) for k in ("seq", "steps", "batch", "pair_batch"))
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch "
          f"{torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=seq, bos_token_id=1,
                          eos_token_id=2, pad_token_id=2)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp / "model")
        tokenizer = models.load_tokenizer(args.tokenizer)
        tokenizer.save_pretrained(tmp / "model")
        rng = random.Random(0)
        # Prompts of ~32 tokens; responses long enough to be cut at the sequence length.
        with open(tmp / "sft.jsonl", "w") as f:
            for _ in range(batch * steps):
                f.write(json.dumps({"prompt": text_of(tokenizer, 32, rng), "response": text_of(tokenizer, seq, rng)}) + "\n")
        with open(tmp / "pairs.jsonl", "w") as f:
            for _ in range(pair_batch * steps):
                f.write(json.dumps({"prompt": text_of(tokenizer, 32, rng), "chosen": text_of(tokenizer, seq, rng),
                                    "rejected": text_of(tokenizer, seq, rng)}) + "\n")
        common = dict(model=str(tmp / "model"), max_length=seq, max_steps=steps, strategy="fsdp",
                      dtype=None if args.tiny else "bf16", warmup_ratio=0.0, log_every=5)
        sft = dict(common, data=str(tmp / "sft.jsonl"), batch_size=batch, lr=1e-5)
        dpo = dict(common, data=str(tmp / "pairs.jsonl"), batch_size=pair_batch, lr=1e-6, loss="dpo")
        runs = [("sft", train_sft, dict(sft, save_every=steps)), ("dpo", train_pref, dpo),
                ("sft_compile", train_sft, dict(sft, compile=True))]
        if torch.cuda.is_available():
            runs.append(("dpo_ref_offload", train_pref, dict(dpo, ref_offload=True, max_steps=6)))
        failed = []
        for name, script, kw in runs:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                script.main(script.Config(**kw, out_dir=str(tmp / name)))
                summary(name, tmp / name, time.perf_counter() - t0)
                shutil.rmtree(tmp / name)  # a 1B run leaves ~20 GB of checkpoint and export behind
            except Exception:
                traceback.print_exc()
                print(f"FAILED {name}", flush=True)
                failed.append(name)
                dist.teardown()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
