"""Real torchrun processes on CPU (gloo): 2 ranks must train exactly like 1 process with the same global
batch, and an uneven last batch must not hang."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import tiny_llama
from tests.test_train_sft import seed_subset

ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}


def run(args, nproc=1, timeout=300):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    p = subprocess.run(launcher + args, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_path):
    d = tmp_path_factory.mktemp("dist")
    tiny_llama(dropout=0.0).save_pretrained(d / "model")  # no dropout: ranks draw different dropout masks
    AutoTokenizer.from_pretrained(smol_path).save_pretrained(d / "model")
    return d, str(d / "model"), seed_subset(d / "seven.jsonl", 7, skip=10)


def test_first_step_gradients_two_ranks_equal_one_process(setup):
    d, model, data = setup
    run(["tests/sft_grad_worker.py", model, data, str(d / "g1.safetensors"), "4", "1"])
    run(["tests/sft_grad_worker.py", model, data, str(d / "g2.safetensors"), "1", "2"], nproc=2)
    g1, g2 = load_file(d / "g1.safetensors"), load_file(d / "g2.safetensors")
    assert g1.keys() == g2.keys()
    for k in g1:
        # rtol 1e-5, and an atol at float32 resolution of the tensor's scale: a few of the tied embedding's
        # 1.5M entries are sums that cancel to ~1e-7 of its largest entry, where summation order shows.
        assert torch.allclose(g1[k], g2[k], rtol=1e-5, atol=1e-6 * g1[k].abs().max().item()), k
        assert not torch.equal(g1[k], torch.zeros_like(g1[k])), k


def test_ddp_loss_trajectory_equals_one_process_and_uneven_data_does_not_hang(setup):
    """7 examples, global batch 2: each epoch ends with a batch of 1, where rank 1 runs a masked stand-in.
    1 process x batch 2, 1 process x batch 1 x accumulation 2, and 2 ranks x batch 1 must agree."""
    d, model, data = setup
    common = ["train_sft.py", "--model", model, "--data", data, "--max_steps", "5", "--lr", "1e-3",
              "--max_length", "128", "--warmup_ratio", "0"]
    run(common + ["--out_dir", str(d / "one"), "--batch_size", "2"])
    run(common + ["--out_dir", str(d / "accum"), "--batch_size", "1", "--grad_accum", "2"])
    run(common + ["--out_dir", str(d / "ddp"), "--batch_size", "1", "--strategy", "ddp"], nproc=2, timeout=120)

    def rows(name):
        return [json.loads(r) for r in (d / name / "metrics.jsonl").read_text().splitlines()]
    one = rows("one")
    assert [r["step"] for r in one] == [1, 2, 3, 4, 5] and one[3]["epoch"] == 0 and one[4]["epoch"] == 1
    for other in ("accum", "ddp"):
        for a, b in zip(one, rows(other), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), other
    assert json.loads((d / "ddp/config.json").read_text())["world_size"] == 2
    w1 = AutoModelForCausalLM.from_pretrained(d / "one/final").state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(d / "ddp/final").state_dict()
    # Adam can turn float-noise gradients into lr-sized steps: allow ~10 x lr x steps.
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 10 * 1e-3 * 5
