"""demo.sh --tiny: the README's first command, end to end on a few prompts, so it cannot rot. Every stage runs, says
how long it took, and leaves an artifact that the next stage (or a user) can read."""
import json
import os
import subprocess
from pathlib import Path

from porover.data import read_pref, read_sft

ROOT = Path(__file__).resolve().parent.parent


def test_demo_tiny_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run(["bash", "demo.sh", "--tiny"], cwd=ROOT, env={**os.environ, "OUT": str(out)},
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    for stage in ("teacher: general answers", "select SFT data", "SFT", "target answers", "overrefused prompts",
                  "pairs", "DPO", "evaluate base", "evaluate porover", "compare"):
        assert f"== {stage}: " in p.stderr, stage  # each stage prints its wall time
    examples, _ = read_sft(out / "sft_data.jsonl")
    pairs, _ = read_pref(out / "pairs/pairs.jsonl")
    assert examples and pairs and {r["meta"]["pair"]["kind"] for r in pairs} <= {"overrefusal", "toxic"}
    for model in ("sft/final", "dpo/final"):
        assert (out / model / "model.safetensors").is_file() and json.loads((out / model / "config.json").read_text())
    for run in ("base", "sft", "porover"):
        res = json.loads((out / "eval" / run / "results.json").read_text())
        assert res["summary"]["not_unsafe"]["n"] == 3 and res["summary"]["not_overrefusal"]["n"] == 3
    summary = json.loads((out / "pairs/pairs.summary.json").read_text())
    assert summary["counts"]["pairs_total"] == len(pairs)
    assert (out / "compare/compare.png").stat().st_size > 0 and "| porover |" in (out / "compare/compare.md").read_text()
    assert "| porover |" in p.stdout and "artifacts:" in p.stdout
