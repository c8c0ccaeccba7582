"""Real torchrun processes on CPU (gloo): 2 ranks (DDP or FSDP2) must train exactly like 1 process with
the same global batch, resume across world sizes, survive a killed save, and fail fast."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import tiny_llama
from tests.test_train_sft import seed_subset

ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}


def run(args, nproc=1, timeout=300, env=None, check=True):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    p = subprocess.run(launcher + args, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_path):
    d = tmp_path_factory.mktemp("dist")
    tiny_llama(dropout=0.0).save_pretrained(d / "model")  # no dropout: ranks draw different dropout masks
    AutoTokenizer.from_pretrained(smol_path).save_pretrained(d / "model")
    pairs = [json.loads(line) for line in open("data/demo/pairs_seed.jsonl")][:7]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return d, str(d / "model"), seed_subset(d / "seven.jsonl", 7, skip=10), str(d / "pairs.jsonl")


def rows(path):
    return [json.loads(r) for r in (path / "metrics.jsonl").read_text().splitlines()]


def test_first_step_gradients_two_ranks_equal_one_process(setup):
    d, model, data, _ = setup
    run(["tests/sft_grad_worker.py", model, data, str(d / "g1.safetensors"), "4", "1"])
    run(["tests/sft_grad_worker.py", model, data, str(d / "g2.safetensors"), "1", "2"], nproc=2)
    g1, g2 = load_file(d / "g1.safetensors"), load_file(d / "g2.safetensors")
    assert g1.keys() == g2.keys()
    for k in g1:
        # rtol 1e-5, and an atol at float32 resolution of the tensor's scale: a few of the tied embedding's
        # 1.5M entries are sums that cancel to ~1e-7 of its largest entry, where summation order shows.
        assert torch.allclose(g1[k], g2[k], rtol=1e-5, atol=1e-6 * g1[k].abs().max().item()), k
        assert not torch.equal(g1[k], torch.zeros_like(g1[k])), k


@pytest.mark.parametrize("script", ["train_sft.py", "train_pref.py"])
def test_two_ranks_train_like_one_process_and_uneven_data_does_not_hang(setup, script):
    """7 examples (or pairs), global batch 2: each epoch ends with a batch of 1, where rank 1 runs a masked
    stand-in. 1 process x batch 2, 1 process x batch 1 x accumulation 2 (derived from --global_batch 2), and
    2 ranks x batch 1 under DDP (--global_batch 2: accumulation 1) and under FSDP2 must give the same losses
    (rtol 1e-5) and final weights within ~10 x lr x steps."""
    d, model, sft_data, pair_data = setup
    data = sft_data if script == "train_sft.py" else pair_data
    out = d / script
    common = [script, "--model", model, "--data", data, "--max_steps", "5", "--lr", "1e-3", "--max_length", "128",
              "--warmup_ratio", "0"]
    run(common + ["--out_dir", str(out / "one"), "--batch_size", "2"])
    run(common + ["--out_dir", str(out / "accum"), "--batch_size", "1", "--global_batch", "2"])
    for strategy, extra in (("ddp", ["--global_batch", "2"]), ("fsdp", [])):
        run(common + ["--out_dir", str(out / strategy), "--batch_size", "1", "--strategy", strategy] + extra, nproc=2,
            timeout=180)
    one = rows(out / "one")
    assert [r["step"] for r in one] == [1, 2, 3, 4, 5] and one[3]["epoch"] == 0 and one[4]["epoch"] == 1
    w1 = AutoModelForCausalLM.from_pretrained(out / "one/final").state_dict()
    for other in ("accum", "ddp", "fsdp"):
        for a, b in zip(one, rows(out / other), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), other
        final = AutoModelForCausalLM.from_pretrained(out / other / "final")  # one plain process reloads it
        assert final.lm_head.weight.data_ptr() == final.get_input_embeddings().weight.data_ptr()
        w2 = final.state_dict()
        # Adam can turn float-noise gradients into lr-sized steps for a few near-zero-gradient weights: allow
        # ~10 x lr x steps for the largest difference, and demand agreement on average.
        diffs = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
        assert diffs.max().item() < 10 * 1e-3 * 5 and diffs.mean().item() < 1e-5, (other, diffs.max(), diffs.mean())
    assert json.loads((out / "fsdp/config.json").read_text())["world_size"] == 2
    for other, accum in (("accum", 2), ("ddp", 1)):
        config = json.loads((out / other / "config.json").read_text())
        assert (config["config"]["grad_accum"], config["global_batch"]) == (accum, 2), other


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(setup, first, second):
    """Save at step 2 with one world size, resume with the other (FSDP2 shards are resharded by
    torch.distributed.checkpoint): losses of steps 3-4 match the uninterrupted run. The resume states the
    global batch as --global_batch 2 (the first run gave none): the same batch, so it is accepted."""
    d, model, _, pair_data = setup
    out = d / f"resume_{first}_{second}"
    common = ["train_pref.py", "--model", model, "--data", pair_data, "--max_steps", "4", "--lr", "1e-3",
              "--max_length", "128", "--warmup_ratio", "0", "--strategy", "fsdp", "--save_every", "2"]
    bs = {1: "2", 2: "1"}
    run(common + ["--out_dir", str(out / "straight"), "--batch_size", bs[first]], nproc=first)
    p = run(["tests/faults.py", "after_save:2"] + common + ["--out_dir", str(out / "cut"), "--batch_size", bs[first]],
            nproc=first, check=False)
    assert p.returncode != 0 and len(rows(out / "cut")) == 2
    run(common + ["--out_dir", str(out / "cut"), "--batch_size", bs[second], "--global_batch", "2", "--resume"],
        nproc=second)
    straight, resumed = rows(out / "straight"), rows(out / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_killed_save_leaves_the_previous_checkpoint_usable(setup):
    d, model, data, _ = setup
    out = d / "killed"
    common = ["train_sft.py", "--model", model, "--data", data, "--max_steps", "4", "--lr", "1e-3",
              "--max_length", "128", "--strategy", "fsdp", "--batch_size", "1", "--save_every", "2",
              "--out_dir", str(out)]
    p = run(["tests/faults.py", "before_rename:4"] + common, nproc=2, check=False)
    assert p.returncode != 0
    names = sorted(x.name for x in (out / "checkpoints").iterdir())
    assert names == [".tmp-step_00000004", "step_00000002"]
    run(common + ["--resume"], nproc=2)
    assert (out / "checkpoints/step_00000004/state.json").exists() and (out / "final/model.safetensors").exists()


def test_a_failing_rank_ends_the_job_fast(setup):
    """Rank 1 raises at its first save while rank 0 waits in the save's barrier. Without torchrun stopping
    it, rank 0 would wait there for the process group's 30-minute timeout; the job must end within 60 s of
    the raise (measured from the time the raising rank prints, so a slow start on a loaded machine does
    not count; it takes a few seconds here)."""
    d, model, data, _ = setup
    p = run(["tests/faults.py", "rank_raises:1", "train_sft.py", "--model", model, "--data", data, "--max_steps", "4",
             "--max_length", "128", "--batch_size", "1", "--save_every", "1", "--out_dir", str(d / "fail")], nproc=2,
            check=False, timeout=300)
    ended = time.time()
    assert p.returncode != 0
    assert "rank 1 failed on purpose" in p.stdout + p.stderr
    raised = float(re.search(r"FAULT_AT (\d+\.\d+)", p.stderr).group(1))
    assert ended - raised < 60
