"""train_sft.py: exact resume, atomic checkpoints, config checks, learning on the embedded model, and the
recipe's schedule, batch and held-out eval set (porover.training)."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_sft
from porover import checkpoint, chat
from porover.losses import sft_loss
from porover.training import TrainConfig, adamw, hold_out, lr_at, resolve
from tests import faults
from tests.conftest import tiny_llama


def seed_subset(path, n, skip=0):
    lines = open("data/demo/sft_seed.jsonl").read().splitlines()
    path.write_text("\n".join(lines[skip:skip + n]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_path):
    """A tiny Llama with attention dropout 0.1, so resuming must restore the RNG to be exact."""
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(dropout=0.1)
    model.train()
    ids = torch.randint(3, 1000, (1, 16))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(smol_path).save_pretrained(d)
    return str(d)


def cfg_for(tiny_dir, data, out, **kw):
    base = dict(model=tiny_dir, data=data, out_dir=str(out), max_steps=6, batch_size=2, grad_accum=2, lr=1e-3,
                warmup_ratio=0.2, max_length=128, save_every=3, seed=7)
    return train_sft.Config(**{**base, **kw})


def restored(tiny_dir, ckpt):
    """Model and AdamW state of a checkpoint, loaded into fresh objects."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    checkpoint.load(ckpt, model, opt)
    return model.state_dict(), opt.state_dict()["state"]


def assert_same_state(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert oa.keys() == ob.keys()
    for k in oa:
        assert all(torch.equal(oa[k][s], ob[k][s]) for s in ("step", "exp_avg", "exp_avg_sq")), k


@pytest.fixture(scope="module")
def straight(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    data = seed_subset(tmp / "d.jsonl", 12)
    train_sft.main(cfg_for(tiny_dir, data, tmp / "run"))
    return data, tmp / "run"


def losses(run):
    return [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_stop_is_exact(tiny_dir, straight, tmp_path, monkeypatch):
    data, ref = straight
    with monkeypatch.context() as m:
        m.setattr(checkpoint, *faults.patch("after_save", 3))
        with pytest.raises(SystemExit, match="after_save"):
            train_sft.main(cfg_for(tiny_dir, data, tmp_path))
    train_sft.main(cfg_for(tiny_dir, data, tmp_path, resume=True))
    assert_same_state(restored(tiny_dir, ref / "checkpoints/step_00000006"),
                      restored(tiny_dir, tmp_path / "checkpoints/step_00000006"))
    assert losses(tmp_path) == losses(ref) and len(losses(ref)) == 6  # each step once, same values


def test_half_written_checkpoint_is_ignored(tiny_dir, straight, tmp_path, monkeypatch):
    data, ref = straight
    with monkeypatch.context() as m:
        m.setattr(checkpoint, *faults.patch("before_rename", 6))
        with pytest.raises(SystemExit, match="before_rename"):
            train_sft.main(cfg_for(tiny_dir, data, tmp_path))
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step_00000006").is_dir() and checkpoint.latest(root).name == "step_00000003"
    train_sft.main(cfg_for(tiny_dir, data, tmp_path, resume=True))
    assert_same_state(restored(tiny_dir, ref / "checkpoints/step_00000006"),
                      restored(tiny_dir, root / "step_00000006"))


def test_resume_refuses_a_changed_config(tiny_dir, straight, tmp_path):
    data, ref = straight
    train_sft.main(cfg_for(tiny_dir, data, tmp_path, max_steps=3))
    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.002"):
        train_sft.main(cfg_for(tiny_dir, data, tmp_path, max_steps=3, lr=2e-3, resume=True))
    train_sft.main(cfg_for(tiny_dir, data, tmp_path, max_steps=4, resume=True, keep_last=1))  # allowed
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]
    # The same path with other contents: the saved data position would point into another dataset.
    edited = tmp_path / "edited.jsonl"
    lines = Path(data).read_text().splitlines()
    edited.write_text("\n".join(lines) + "\n")
    train_sft.main(cfg_for(tiny_dir, str(edited), tmp_path / "e", max_steps=3))
    edited.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"data_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        train_sft.main(cfg_for(tiny_dir, str(edited), tmp_path / "e", max_steps=4, resume=True))
    state = tmp_path / "e/checkpoints/step_00000003/state.json"  # as written before the hash was recorded
    saved = json.loads(state.read_text())
    del saved["config"]["data_sha256"]
    state.write_text(json.dumps(saved))
    train_sft.main(cfg_for(tiny_dir, str(edited), tmp_path / "e", max_steps=4, resume=True))
    # Written before --min_lr: its schedule decayed to 0 and its optimizer had one parameter group.
    state = tmp_path / "e/checkpoints/step_00000004/state.json"
    saved = json.loads(state.read_text())
    del saved["config"]["min_lr"]
    state.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="written before --min_lr and the weight-decay groups"):
        train_sft.main(cfg_for(tiny_dir, str(edited), tmp_path / "e", max_steps=5, resume=True))
    # --resume with nothing to resume and no --save_every would restart from scratch at every requeue
    with pytest.raises(ValueError, match="no --save_every: nothing would ever be resumed"):
        train_sft.main(cfg_for(tiny_dir, data, tmp_path / "f", max_steps=3, resume=True, save_every=None))


def test_final_export_reloads_with_tied_weights(straight):
    _, ref = straight
    model = AutoModelForCausalLM.from_pretrained(ref / "final")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (ref / "final" / "model.safetensors").exists() and (ref / "final" / "tokenizer.json").exists()
    config = json.loads((ref / "config.json").read_text())
    assert config["global_batch"] == 4 and config["input_sha256"]["data"] and "git_commit" in config


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=1), "--epochs or --max_steps"),
    (dict(eval_every=2), "--eval_every needs --eval_data"),
    (dict(keep_last=2, save_every=None), "--keep_last needs --save_every"),
    (dict(batch_size=0), "--batch_size must be at least 1"),
    (dict(max_prompt_length=127), "--max_prompt_length"),
    (dict(max_prompt_length=0), "--max_prompt_length must be at least 1"),
    (dict(max_grad_norm=0.0), "--max_grad_norm must be positive"),
    (dict(global_batch=0), "--global_batch must be at least 1"),
    (dict(global_batch=5), "--global_batch 5 is not a multiple of --batch_size 2 x 1 processes"),
    (dict(global_batch=6), r"--grad_accum 2 makes a global batch of 4 \(2 x 2 x 1 processes\), not --global_batch 6"),
    (dict(min_lr=2e-3), r"--min_lr 0\.002 must be in \[0, --lr 0\.001\]"),
    (dict(val_size=2, eval_data="e.jsonl"), "give --eval_data or --val_size, not both"),
    (dict(val_size=-1), "--val_size must be non-negative"),
])
def test_contradictory_or_unused_settings_are_errors(tiny_dir, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train_sft.main(cfg_for(tiny_dir, "unused.jsonl", tmp_path, **bad))


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        train_sft.parse(train_sft.Config, ["--learning_rate", "1e-4"])
    assert "unrecognized arguments: --learning_rate" in capsys.readouterr().err


def test_sft_memorises_seed_answers_on_the_embedded_model(tmp_path, smol_path):
    """Four seed examples, 12 full-batch steps at lr 1e-4. Threshold: a token-mean NLL below 0.1 nats means a
    geometric-mean probability above e^-0.1 = 0.90 for the trained tokens, against about e^-2 = 0.14 for
    the untrained model (its first-step loss is near 2). Greedy decoding then reproduces the answer."""
    data = seed_subset(tmp_path / "d.jsonl", 4, skip=40)
    cfg = train_sft.Config(data=data, eval_data=data, eval_every=12, out_dir=str(tmp_path / "run"), max_steps=12,
                           batch_size=4, lr=1e-4, warmup_ratio=0.0, max_length=256)
    train_sft.main(cfg)
    rows = [json.loads(r) for r in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 1.0 and rows[-1]["eval/loss"] < 0.1
    example = json.loads(open(data).readline())
    tok = AutoTokenizer.from_pretrained(tmp_path / "run/final")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run/final").eval()
    prompt = torch.tensor([chat.encode_prompt(tok, [{"role": "user", "content": example["prompt"]}])])
    out = model.generate(prompt, max_new_tokens=200, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    assert tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip() == example["response"].strip()


def test_flops_per_token_counts_lm_head_not_the_input_embedding():
    """Tiny Llama, tied: N = all parameters (the shared matrix listed once, as lm_head) = 6N per token;
    untied: the separate input embedding (49152 x 32) is not counted. +2N with an online reference."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from porover.parallel import flops_per_token
    tied = tiny_llama()
    n = sum(p.numel() for p in tied.parameters())
    assert flops_per_token(tied, online_reference=False) == 6 * n
    assert flops_per_token(tied, online_reference=True) == 8 * n
    untied = LlamaForCausalLM(LlamaConfig(**{**tied.config.to_dict(), "tie_word_embeddings": False}))
    assert sum(p.numel() for p in untied.parameters()) == n + 49152 * 32
    assert flops_per_token(untied, online_reference=False) == 6 * n


@pytest.mark.parametrize("bad,match", [(dict(dtype="fp16"), "fp16 is not supported"),
                                       (dict(compile=True, grad_checkpointing=True), "--compile with --grad_")])
def test_refused_precision_and_combinations(tiny_dir, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train_sft.main(cfg_for(tiny_dir, "unused.jsonl", tmp_path, **bad))


def test_bf16_on_cpu_trains(straight, tiny_dir, tmp_path, monkeypatch):
    """--dtype bf16 on CPU (DDP path, one process): the forward runs under bf16 autocast (its logits are
    bf16) over fp32 master weights, the loss falls over the 6 steps, and it stays within 0.01 nats of the
    fp32 run's at every step (bf16 rounds the forward; this tiny model's logits are near 0, loss ~ ln V)."""
    data, ref = straight
    dtypes = set()

    def recording_sft_loss(logits, *args, **kwargs):
        dtypes.add(logits.dtype)
        return sft_loss(logits, *args, **kwargs)
    monkeypatch.setattr(train_sft, "sft_loss", recording_sft_loss)
    train_sft.main(cfg_for(tiny_dir, data, tmp_path, dtype="bf16", strategy="ddp", save_every=None))
    assert dtypes == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bf16"
    bf16, fp32 = losses(tmp_path), losses(ref)
    assert len(bf16) == 6 and bf16[-1] < bf16[0] - 0.05
    assert bf16 == pytest.approx(fp32, abs=0.01)


def test_compile_matches_eager(straight, tiny_dir, tmp_path):
    """--compile (torch.compile per decoder layer) trains the same: losses within float tolerance."""
    data, ref = straight
    model = tmp_path / "m"
    tiny_llama(dropout=0.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(model)
    for name, flag in (("eager", False), ("compiled", True)):
        train_sft.main(cfg_for(str(model), data, tmp_path / name, max_steps=2, save_every=None, compile=flag))
    for a, b in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_eval_data_without_eval_every_evaluates_at_the_end(tiny_dir, straight, tmp_path):
    """Only the last row has eval/loss, and it is the token-mean NLL of the final weights on the eval set,
    recomputed here one example at a time from the export (batched and padded there: float tolerance)."""
    data, _ = straight
    cfg = cfg_for(tiny_dir, data, tmp_path, max_steps=2, save_every=None, eval_data=data)
    train_sft.main(cfg)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "eval/loss" not in rows[0]
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    items, _ = train_sft.load_split(data, tok, chat.prepare_tokenizer(tok), cfg, "eval")
    nll = tokens = 0.0
    with torch.no_grad():
        for b in (chat.collate([it], tok.pad_token_id) for it in items):
            nll += sft_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"], 1).item()
            tokens += b["loss_mask"][:, 1:].sum().item()
    assert rows[1]["eval/loss"] == pytest.approx(nll / tokens, rel=1e-5)


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tiny_dir, straight, tmp_path):
    data, _ = straight
    train_sft.main(cfg_for(tiny_dir, data, tmp_path, max_steps=3))
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        train_sft.main(cfg_for(tiny_dir, data, tmp_path, max_steps=3))


def test_resume_at_the_end_repairs_a_missing_export_and_a_torn_metrics_line(tiny_dir, straight, tmp_path):
    """A run killed during its final export (its last checkpoint complete), with a half-written metrics row."""
    data, ref = straight
    train_sft.main(cfg_for(tiny_dir, data, tmp_path, max_steps=3))
    import shutil
    shutil.rmtree(tmp_path / "final")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    train_sft.main(cfg_for(tiny_dir, data, tmp_path, max_steps=3, resume=True))
    assert (tmp_path / "final/model.safetensors").exists()
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_length_groups_do_not_depend_on_how_the_global_batch_is_split():
    """--group_by_length and a resume on another world size (batch_size 4 x 1 rank -> 2 x 2 ranks): each
    global batch holds the same examples, so the epoch continues exactly."""
    from porover.training import global_batch
    lengths = [(i * 37) % 200 + 1 for i in range(100)]
    items = list(range(100))

    def batch_sets(batch_size, world):
        cfg = train_sft.Config(batch_size=batch_size, grad_accum=1, group_by_length=True, seed=3)
        out = []
        for seen in range(0, 100, 4):
            ids = set()
            for rank in range(world):
                mbs = global_batch(items, lengths, seen, cfg, rank, world, lambda xs: xs, lambda x: None)[0]
                ids |= {i for mb in mbs for i in mb if i is not None}
            out.append(ids)
        return out
    assert batch_sets(4, 1) == batch_sets(2, 2)


def test_lr_at_by_hand():
    """Cosine from lr 1e-3 to the floor 1e-4 over 10 steps: lr at step 0, the midpoint (1e-3 + 1e-4) / 2 at
    step 5, 1e-4 + 9e-4 sin^2(pi/20) = 1.220246e-4 at the last step (9), the floor at step 10. With 2 warmup
    steps: 5e-4, 1e-3, then the cosine over the remaining 8 (its midpoint at step 6). A floor of 0 is the old
    schedule (5e-4 at the midpoint)."""
    at = [lr_at(s, 10, 1e-3, 0, 1e-4) for s in (0, 5, 9, 10)]
    assert at == pytest.approx([1e-3, 5.5e-4, 1.220246e-4, 1e-4], rel=1e-6)
    warm = [lr_at(s, 10, 1e-3, 2, 1e-4) for s in (0, 1, 2, 6, 10)]
    assert warm == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4, 1e-4], rel=1e-6)
    assert lr_at(5, 10, 1e-3, 0) == pytest.approx(5e-4, rel=1e-9)


def test_resolve_derives_grad_accum_and_caps_the_default_floor():
    """--global_batch N: grad_accum = N / (batch_size x world); an explicit --grad_accum must agree. The default
    --min_lr is 1e-6, or --lr when that is lower (so --lr 5e-7 is a constant rate after warmup)."""
    c = resolve(TrainConfig(batch_size=2, global_batch=8), world=2)
    assert (c.grad_accum, c.global_batch, c.min_lr) == (2, 8, 1e-6)
    assert resolve(TrainConfig(batch_size=2, grad_accum=4, global_batch=8), world=1).grad_accum == 4
    assert (resolve(TrainConfig(), 1).grad_accum, resolve(TrainConfig(batch_size=4), 3).global_batch) == (1, 12)
    with pytest.raises(ValueError, match="--global_batch 8 is not a multiple of --batch_size 2 x 3 processes"):
        resolve(TrainConfig(batch_size=2, global_batch=8), world=3)
    assert resolve(TrainConfig(batch_size=2, grad_accum=2, global_batch=8), world=2).grad_accum == 2
    with pytest.raises(ValueError, match="--grad_accum 1 makes a global batch of 4"):
        resolve(TrainConfig(batch_size=2, grad_accum=1, global_batch=8), world=2)
    assert resolve(TrainConfig(lr=5e-7), 1).min_lr == 5e-7 and resolve(TrainConfig(min_lr=0.0), 1).min_lr == 0.0


def test_paper_defaults_and_weight_decay_spares_1d_parameters():
    """SFT lr 1e-5, weight decay 0.01 on matrices (linear layers, the tied embedding) only: norm weights
    (and biases, 1-D like them) are not decayed."""
    assert (train_sft.Config().lr, train_sft.Config().weight_decay, train_sft.Config().min_lr) == (1e-5, 0.01, None)
    model = tiny_llama()
    groups = adamw(model, TrainConfig(), torch.device("cpu")).param_groups
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(decay) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.01 if p.ndim >= 2 else 0.0), name
    assert decay[id(model.model.norm.weight)] == 0.0 and decay[id(model.lm_head.weight)] == 0.01


def test_global_batch_and_min_lr_in_a_run(tiny_dir, straight, tmp_path):
    """--global_batch 8 at batch 2 on one process trains with grad_accum 4; the metrics' lr follows the cosine
    from 1e-3 to --min_lr 1e-4 over 4 steps: 1e-3, 1e-4 + 9e-4 (1 + cos(pi/4))/2, 5.5e-4, 1e-4 + 9e-4 (1 -
    cos(pi/4))/2; config.json records the resolved values."""
    data, _ = straight
    train_sft.main(cfg_for(tiny_dir, data, tmp_path, max_steps=4, save_every=None, warmup_ratio=0.0, grad_accum=None,
                           global_batch=8, min_lr=1e-4))
    c = math.cos(math.pi / 4)
    lrs = [json.loads(r)["lr"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3, 1e-4 + 9e-4 * (1 + c) / 2, 5.5e-4, 1e-4 + 9e-4 * (1 - c) / 2], rel=1e-9)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["global_batch"] == 8 and config["train_examples"] == 12 and config["eval_examples"] == 0
    assert {k: config["config"][k] for k in ("grad_accum", "global_batch", "min_lr", "weight_decay", "val_size")} == \
        {"grad_accum": 4, "global_batch": 8, "min_lr": 1e-4, "weight_decay": 0.01, "val_size": 0}


def test_val_size_holds_out_a_seeded_share_of_data(tiny_dir, straight, tmp_path, monkeypatch):
    """--val_size 4 of 12 examples: training sees the other 8 only, the 4 are the eval set (evaluated like
    --eval_data), config.json counts both. The choice depends on --seed and the data alone (not the world
    size or the step), so every rank and a resume hold out the same ones; too few left is an error."""
    data, _ = straight
    seen = {}
    real_batch, real_eval = train_sft.global_batch, train_sft.evaluate
    monkeypatch.setattr(train_sft, "global_batch", lambda items, *a: real_batch(seen.setdefault("train", items), *a))
    monkeypatch.setattr(train_sft, "evaluate", lambda m, items, *a: real_eval(m, seen.setdefault("eval", items), *a))
    cfg = cfg_for(tiny_dir, data, tmp_path, max_steps=2, save_every=None, val_size=4, eval_every=1)
    train_sft.main(cfg)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    items, _ = train_sft.load_split(data, tok, chat.prepare_tokenizer(tok), cfg, "all")
    key = lambda it: tuple(it["input_ids"])  # noqa: E731
    train, held = seen["train"], seen["eval"]
    assert (len(train), len(held), len(set(map(key, items)))) == (8, 4, 12)
    assert sorted(map(key, train + held)) == sorted(map(key, items)) and not set(map(key, train)) & set(map(key, held))
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("eval/loss" in r for r in rows)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["train_examples"], config["eval_examples"], config["config"]["val_size"]) == (8, 4, 4)
    assert hold_out(items, resolve(cfg, 1), 1) == (train, held)
    two_ranks = resolve(dataclasses.replace(cfg, batch_size=1), 2)
    assert hold_out(items, two_ranks, 2) == (train, held)
    assert hold_out(items, resolve(dataclasses.replace(cfg, seed=8), 1), 1)[1] != held
    with pytest.raises(ValueError, match=r"--val_size 9 leaves 3 of the 12 usable .* than one global batch \(4\)"):
        hold_out(items, resolve(dataclasses.replace(cfg, val_size=9), 1), 1)
