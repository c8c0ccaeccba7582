"""Memory and time of the token log-probs (forward + backward): porover.losses.token_logps (LabelLogps: keeps
the logits and one logsumexp per row) against the plain formula it replaced (an fp32 copy of the logits into
F.cross_entropy, which keeps an fp32 log-softmax for the backward).

    python bench/logps_memory.py [--batch 4] [--seq 1024] [--vocab 49152] [--repeats 5]

Each (variant, dtype) runs in its own process: peak RSS (ru_maxrss only grows) above the level reached once
the logits exist, over one forward + backward; then the median wall time of --repeats more. The logits'
gradient (the same size for both) is part of the peak. On a GPU the same saving applies to bf16 logits.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_token_logps(logits, input_ids, loss_mask):
    import torch.nn.functional as F
    B, T, V = logits.shape
    labels = F.pad(input_ids[:, 1:], (0, 1))
    logps = -F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(-1), reduction="none")
    return logps.view(B, T)[:, :-1].masked_fill(~loss_mask[:, 1:].bool(), 0.0)


def measure(variant, dtype, batch, seq, vocab, repeats):
    import torch
    from porover.losses import token_logps
    fn = token_logps if variant == "lean" else plain_token_logps
    torch.manual_seed(0)
    logits = torch.randn(batch, seq, vocab, dtype=getattr(torch, dtype), requires_grad=True)
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(logits, ids, mask).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    times = []
    for _ in range(repeats):
        logits.grad = None
        t0 = time.perf_counter()
        fn(logits, ids, mask).sum().backward()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "dtype": dtype, "peak_mb": peak / 1024, "seconds": statistics.median(times),
            "logits_mb": logits.numel() * logits.element_size() / 2**20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: variant dtype, in a fresh process
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(*a.one, a.batch, a.seq, a.vocab, a.repeats)))
        return
    print(f"B={a.batch} T={a.seq} V={a.vocab}, forward + backward, CPU")
    print("| dtype | logits MB | plain peak MB | lean peak MB | plain s | lean s |\n|---|---:|---:|---:|---:|---:|")
    for dtype in ("float32", "bfloat16"):
        res = {}
        for variant in ("plain", "lean"):
            out = subprocess.run([sys.executable, __file__, "--one", variant, dtype, "--batch", str(a.batch), "--seq",
                                  str(a.seq), "--vocab", str(a.vocab), "--repeats", str(a.repeats)],
                                 capture_output=True, text=True, check=True).stdout
            res[variant] = json.loads(out.splitlines()[-1])
        p, q = res["plain"], res["lean"]
        print(f"| {dtype} | {p['logits_mb']:.0f} | {p['peak_mb']:.0f} | {q['peak_mb']:.0f} | {p['seconds']:.2f} | "
              f"{q['seconds']:.2f} |")


if __name__ == "__main__":
    main()
