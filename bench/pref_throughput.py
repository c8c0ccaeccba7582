"""Preference training: online reference versus --precompute_ref, embedded SmolLM2-135M, DPO.

    python bench/pref_throughput.py [--steps 6] [--repeats 5]

Batch 4 pairs, max_length 256, fp32 on CPU, the seed pairs. Each run is its own process (peak RSS from
ru_maxrss only grows), online and precomputed interleaved, median step time over steps 3.. of each run,
then the median over repeats. The one-time precompute pass is timed separately (a fresh cache each run).
Ideal speed-up: 6N + 2N FLOPs per token online versus 6N precomputed, about 1.33x.
"""
import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(mode, steps):
    import contextlib
    import io

    import train_pref

    with tempfile.TemporaryDirectory() as out:
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            train_pref.main(train_pref.Config(max_steps=steps, batch_size=4, max_length=256, out_dir=out,
                                              precompute_ref=mode == "precomputed", lr=1e-6))
        total = time.perf_counter() - t0
        rows = [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["step_time"] for r in rows][2:]
    return {"step_time": statistics.median(step_times), "tokens_per_sec": statistics.median(
        r["tokens_per_sec"] for r in rows[2:]), "run_seconds": total,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "precompute_seconds": float(next(iter(re.findall(r"computed in ([\d.]+) s", log.getvalue())), "nan"))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["online", "precomputed"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3: the first 2 steps are warm-up, excluded from the medians")
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    runs = {"online": [], "precomputed": []}
    for r in range(args.repeats):
        for mode in runs:
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"repeat {r} {mode}: {runs[mode][-1]}", flush=True)
    med = {m: statistics.median(x["step_time"] for x in v) for m, v in runs.items()}
    for m, v in runs.items():
        print(f"{m:12s} median step {med[m]:.2f} s, {statistics.median(x['tokens_per_sec'] for x in v):.1f} tok/s, "
              f"peak RSS {max(x['peak_rss_gb'] for x in v):.2f} GB")
    print(f"precomputed / online speed-up per step: {med['online'] / med['precomputed']:.3f}x (ideal ~1.33x); "
          f"one-time precompute pass (12 pairs) median "
          f"{statistics.median(x['precompute_seconds'] for x in runs['precomputed']):.1f} s")


if __name__ == "__main__":
    main()
