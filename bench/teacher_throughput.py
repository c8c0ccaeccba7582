"""Teacher-call throughput against a loopback server that answers every request after L seconds.

    .venv/bin/python bench/teacher_throughput.py [--latency 1.0] [--concurrency 1 8 64]

For each concurrency C, 10*C requests go out (a) through porover.client.Client.chat_many and (b) through
`overgen.py generate` in-process (one prompt per request, records written and flushed, progress bar on).
The ideal is C/L requests per second (issue 7's target: at least 90% of it); client CPU is this process's
user + system time per request. The server runs in its own process, so its CPU is not counted.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import overgen  # noqa: E402
from porover.client import Client  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def via_client(base_url, c, n, tmp):
    reqs = [{"messages": [{"role": "user", "content": f"prompt {i}"}], "model": "bench", "max_tokens": 16}
            for i in range(n)]
    results = Client(base_url, concurrency=c).chat_many(reqs)
    assert all(r.status == "ok" for r in results)


def via_overgen(base_url, c, n, tmp):
    prompts = Path(tmp) / f"prompts{c}.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"prompt {i}"}) + "\n" for i in range(n)))
    out = Path(tmp) / f"out{c}.jsonl"
    overgen.main(overgen.GenerateConfig(input=str(prompts), output=str(out), base_url=base_url, model="bench",
                                        n=1, max_new_tokens=16, concurrency=c))
    assert len(out.read_text().splitlines()) == n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    args = p.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_server.py"), "--latency",
                               str(args.latency)], stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        base_url = f"http://127.0.0.1:{server.stdout.readline().split()[1]}/v1"
        with tempfile.TemporaryDirectory() as tmp:
            for name, fn in (("client", via_client), ("overgen", via_overgen)):
                for c in args.concurrency:
                    n = 10 * c
                    t0, cpu0 = time.perf_counter(), cpu_seconds()
                    fn(base_url, c, n, tmp)
                    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
                    ideal = c / args.latency
                    rows.append((name, c, n, wall, n / wall, ideal, n / wall / ideal, 1000 * cpu / n))
    finally:
        server.kill()
    print(f"\nloopback server answering after L = {args.latency} s; {os.cpu_count()} CPUs")
    print("| path | C | requests | wall s | req/s | ideal C/L | % of ideal | client CPU ms/req |")
    print("|---|---|---|---|---|---|---|---|")
    for name, c, n, wall, rps, ideal, eff, ms in rows:
        print(f"| {name} | {c} | {n} | {wall:.2f} | {rps:.2f} | {ideal:.0f} | {100 * eff:.1f}% | {ms:.2f} |")


if __name__ == "__main__":
    main()
