"""train_pref.py: the losses' options and aggregation, step 0, reference log-probs (online, precomputed,
cached), learning on the embedded model, resume, and input rules (the losses' hand values: test_losses.py)."""
import dataclasses
import json
import math
import re
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

import train_pref
from porover import chat, checkpoint, losses, reference
from porover.data import DataError, read_pref
from tests import faults
from tests.conftest import tiny_llama
from tests.test_losses import AGG_IDS, AGG_LOGITS, AGG_MASK
from tests.test_train_sft import assert_same_state, restored


# ---- the trainer feeds each loss its aggregation -------------------------------------------------------

@pytest.mark.parametrize("logp_agg,expected", [(None, 25.0), ("mean", 25.0), ("sum", 9.0)])
def test_the_trainer_aggregates_as_the_loss_says(logp_agg, expected):
    """train_pref.pair_losses on test_losses's AGG pair (a stand-in policy returning its logits; the reference
    precomputed as 0): IPO at beta 0.1 uses the token mean by default (25), the sum with --logp_agg sum (9)."""
    cfg = train_pref.Config(loss="ipo", beta=0.1, logp_agg=logp_agg)
    opts = train_pref.loss_options(cfg)
    batch = {"input_ids": AGG_IDS, "attention_mask": torch.ones_like(AGG_IDS), "loss_mask": AGG_MASK,
             "weight": torch.ones(1), "ref": torch.zeros(1, 2)}
    policy = lambda **kw: SimpleNamespace(logits=AGG_LOGITS)  # noqa: E731
    pair, stats = train_pref.pair_losses(policy, None, batch, opts, cfg, torch.autocast("cpu", enabled=False))
    assert pair.tolist() == pytest.approx([expected], abs=1e-5)
    assert stats["length/chosen"] == 2 and stats["length/rejected"] == 4


# ---- the model side --------------------------------------------------------------------------------------

PAIRS = [{"prompt": "How do I kill a stuck process?", "chosen": "Use `kill PID`, or `kill -9 PID` if it ignores that.",
          "rejected": "I can't help with that."},
         {"prompt": "How do I shoot a good photo at night?",
          "chosen": "Use a tripod, a wide aperture and a longer exposure; raise ISO only as needed.",
          "rejected": "Sorry, I won't help with shooting."}]


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_path):
    d = tmp_path_factory.mktemp("tiny_pref")
    tiny_llama(dropout=0.1).save_pretrained(d)
    AutoTokenizer.from_pretrained(smol_path).save_pretrained(d)
    return str(d)


def pair_batch(smol_tok, rows=PAIRS):
    tok, eot = smol_tok
    examples = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"],
                 "rejected": r["rejected"]} for r in rows]
    pairs, _ = chat.tokenize_pairs(tok, eot, examples, 256)
    return pairs, partial(train_pref.collate, pad_id=tok.pad_token_id)


def test_concatenated_forward_equals_separate_forwards(smol_tok):
    model = tiny_llama().eval()
    pairs, collate = pair_batch(smol_tok)
    with torch.no_grad():
        both, counts = reference.sequence_stats(model, collate(pairs), torch.autocast("cpu", enabled=False))
        chosen = reference.sequence_stats(model, chat.collate([p["chosen"] for p in pairs], 2), torch.autocast("cpu", enabled=False))[0]
        rejected = reference.sequence_stats(model, chat.collate([p["rejected"] for p in pairs], 2), torch.autocast("cpu", enabled=False))[0]
    # Other padding changes the float summation order: 1e-3 nats at most.
    assert torch.allclose(both, torch.cat([chosen, rejected]), rtol=1e-6, atol=1e-3)
    assert counts.tolist() == [sum(p[s]["loss_mask"]) for s in ("chosen", "rejected") for p in pairs]


def test_dpo_gradient_raises_chosen_and_lowers_rejected(smol_tok):
    """One SGD step on the DPO loss (reference = a frozen copy): the chosen log-prob goes up, the rejected
    one down. A sign error in h or in the loss would do the opposite."""
    policy, ref = tiny_llama(), tiny_llama().eval()
    pairs, collate = pair_batch(smol_tok)
    batch, off = collate(pairs), torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        ref_c, ref_r = reference.sequence_stats(ref, batch, off)[0].chunk(2)
        before_c, before_r = reference.sequence_stats(policy, batch, off)[0].chunk(2)
    pc, pr = reference.sequence_stats(policy, batch, off)[0].chunk(2)
    losses.dpo_loss(pc, pr, ref_c, ref_r, beta=0.1).mean().backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.05 * p.grad
        after_c, after_r = reference.sequence_stats(policy, batch, off)[0].chunk(2)
    assert (after_c > before_c).all() and (after_r < before_r).all()


def test_precomputed_equals_online(smol_tok, tmp_path):
    model = tiny_llama().eval()
    pairs, collate = pair_batch(smol_tok)
    keys = [reference.pair_key(p, 256, None) for p in pairs]
    off = torch.autocast("cpu", enabled=False)
    ref, computed = reference.precompute(model, pairs, keys, tmp_path / "c.safetensors", 2, collate, "cpu", off)
    assert computed == 2
    with torch.no_grad():
        online = reference.sequence_stats(model, collate(pairs), off)[0]
    assert torch.equal(ref.T.reshape(-1).float(), online)  # identical batching: exact
    one_by_one, _ = reference.precompute(model, pairs, keys, tmp_path / "d.safetensors", 1, collate, "cpu", off)
    assert torch.allclose(one_by_one, ref, rtol=1e-6, atol=1e-3)  # other batching: 1e-3 nats at most
    again, computed = reference.precompute(model, pairs, keys, tmp_path / "c.safetensors", 2, collate, "cpu", off)
    assert computed == 0 and torch.equal(again, ref)


def base_cfg(model, data, out, **kw):
    return train_pref.Config(**{**dict(model=model, data=data, out_dir=str(out), max_steps=1, batch_size=2, lr=1e-3,
                                       max_length=128, warmup_ratio=0.0), **kw})


def rows(run):
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss,expected", [("dpo", math.log(2)), ("ipo", 1 / (4 * 0.1 ** 2)), ("hinge", 1.0),
                                           ("robust", math.log(2))])
@pytest.mark.parametrize("precompute", [False, True])
def test_step_zero_policy_equals_reference(tiny_dir, tmp_path, loss, expected, precompute):
    """Policy = reference, same weights and forward (a dropout-free checkpoint, since the policy trains with
    dropout live and the reference runs in eval mode): online to 1e-6, precomputed (other batching) to 1e-4."""
    model = str(tmp_path / "m")
    tiny_llama(dropout=0.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(model)
    data = write_pairs(tmp_path / "p.jsonl", PAIRS)
    train_pref.main(base_cfg(model, data, tmp_path / "run", loss=loss, precompute_ref=precompute))
    first = rows(tmp_path / "run")[0]
    tol = 1e-4 if precompute else 1e-6
    assert first["loss"] == pytest.approx(expected, abs=tol * max(1, expected))
    assert abs(first["rewards/chosen"]) < tol and abs(first["rewards/rejected"]) < tol
    assert first["rewards/accuracies"] == 0.0


def ref_counts(capsys):
    found = re.findall(r"reference log-probs: (\d+) cached, (\d+) computed", capsys.readouterr().out)
    return tuple(int(x) for x in found[-1])


def test_reference_cache_invalidation(tiny_dir, tmp_path, capsys):
    model = str(tmp_path / "m")
    tiny_llama(dropout=0.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(model)
    rows4 = PAIRS + [{"prompt": "Define arson.", "chosen": "Arson is the crime of deliberately setting fire to "
                      "property.", "rejected": "I can't discuss crimes."},
                     {"prompt": "How do I beat my brother at chess?", "chosen": "Control the centre early.",
                      "rejected": "I won't help you beat anyone."}]
    data = write_pairs(tmp_path / "p.jsonl", rows4)
    out = tmp_path / "run"

    def run(**kw):
        train_pref.main(base_cfg(model, data, out, precompute_ref=True, **kw))
        return ref_counts(capsys)
    assert run() == (0, 4)
    assert run(lr=5e-4, beta=0.2, seed=3) == (4, 0)          # nothing that the reference depends on
    assert run(max_length=64) == (0, 4)                       # length settings
    rows4[0]["chosen"] = "Run `kill -TERM PID` first."
    write_pairs(tmp_path / "p.jsonl", rows4)
    assert run() == (3, 1)                                    # one data line
    tok_file = tmp_path / "m" / "tokenizer.json"
    spec = json.loads(tok_file.read_text())
    spec["added_tokens"].append({**spec["added_tokens"][-1], "id": max(t["id"] for t in spec["added_tokens"]) + 1,
                                 "content": "<|unused_marker|>"})
    tok_file.write_text(json.dumps(spec))
    assert run() == (0, 4)                                    # a tokenizer file
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        m.model.norm.weight[0] += 1e-3
    m.save_pretrained(model)
    assert run() == (0, 4)                                    # one weight
    assert run() == (4, 0)
    cfg_file = tmp_path / "m" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "rms_norm_eps": 1e-3}))
    assert run() == (0, 4)                                    # the architecture config, same weights


def test_resume_is_exact(tiny_dir, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "p.jsonl", PAIRS * 3)
    cfg = partial(base_cfg, tiny_dir, data, max_steps=4, batch_size=1, grad_accum=2, save_every=2, lr=1e-3)
    train_pref.main(cfg(tmp_path / "a"))
    with monkeypatch.context() as m:
        m.setattr(checkpoint, *faults.patch("after_save", 2))
        with pytest.raises(SystemExit, match="after_save"):
            train_pref.main(cfg(tmp_path / "b"))
    train_pref.main(cfg(tmp_path / "b", resume=True))
    assert_same_state(restored(tiny_dir, tmp_path / "a/checkpoints/step_00000004"),
                      restored(tiny_dir, tmp_path / "b/checkpoints/step_00000004"))
    assert [r["loss"] for r in rows(tmp_path / "a")] == [r["loss"] for r in rows(tmp_path / "b")]


@pytest.mark.parametrize("kw,match", [
    (dict(loss="simpo", ref_model="x"), "reference-free"),
    (dict(loss="simpo", precompute_ref=True), "reference-free"),
    (dict(loss="simpo", logp_agg="sum"), "length-normalised"),
    (dict(loss="robust", label_smoothing=0.5), "< 0.5"),
    (dict(loss="dpo", simpo_gamma=0.5), "--simpo_gamma is not used by --loss dpo"),
    (dict(loss="ipo", label_smoothing=0.1), "--label_smoothing is not used by --loss ipo"),
    (dict(loss="nope"), "is not one of dpo, ipo"),
    (dict(ref_batch_size=8), "--ref_batch_size needs --precompute_ref"),
    (dict(ref_batch_size=0, precompute_ref=True), "--ref_batch_size must be at least 1"),
    (dict(nll_weight=-5.0), "--nll_weight must be non-negative"),
    (dict(beta=0.0), "--beta must be positive"),
    (dict(loss="simpo", beta=-1.0), "--beta must be positive"),
    (dict(loss="dpo", label_smoothing=0.5), r"--label_smoothing must be in \[0, 0\.5\)"),
    (dict(loss="robust", label_smoothing=0.0), "< 0.5"),
    (dict(loss="hinge", label_smoothing=0.1), "--label_smoothing is not used by --loss hinge"),
    (dict(loss="simpo", label_smoothing=0.1), "--label_smoothing is not used by --loss simpo"),
    (dict(loss="ipo", simpo_gamma=0.5), "--simpo_gamma is not used by --loss ipo"),
    (dict(loss="dpo", logp_agg="avg"), "--logp_agg must be sum or mean"),
    (dict(val_size=1, eval_data="e.jsonl"), "give --eval_data or --val_size, not both"),
])
def test_unused_or_contradictory_options_are_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train_pref.main(base_cfg("unused", "unused.jsonl", tmp_path, **kw))


def test_bad_pairs_are_counted_or_named(tmp_path, smol_tok):
    good = {"prompt": "hi", "chosen": "hello", "rejected": "no"}
    path = write_pairs(tmp_path / "p.jsonl", [good, {**good, "rejected": "hello "}, {**good, "chosen": ""},
                                              {**good, "prompt": "long " * 300}])
    examples, skipped = read_pref(path)
    assert len(examples) == 2 and skipped == {"chosen_equals_rejected": 1, "empty_chosen": 1}
    tok, eot = smol_tok
    pairs, counts = chat.tokenize_pairs(tok, eot, examples, 128)
    assert len(pairs) == 1 and counts == {"prompt_too_long": 1}
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n{\"prompt\": \"x\", \"chosen\": \n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_pref(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'rejected'"):
        read_pref(tmp_path / "bad.jsonl")


def test_message_list_pairs(tmp_path):
    conv = [{"role": "user", "content": "hi"}]
    path = write_pairs(tmp_path / "p.jsonl", [{"chosen": conv + [{"role": "assistant", "content": "hello"}],
                                              "rejected": conv + [{"role": "assistant", "content": "no"}]}])
    (ex,), _ = read_pref(path)
    assert ex["prompt"] == conv and ex["chosen"] == "hello" and ex["rejected"] == "no"


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_learns_on_the_embedded_model(tmp_path, loss):
    """8 seed pairs (helpful answer vs refusal on seemingly toxic prompts), full batch, 3 steps. After
    training, on the same pairs: accuracy >= 7/8, a positive mean margin, and a rejected log-prob below
    its step-0 value (the first logged row is measured before the first update)."""
    lines = open("data/demo/pairs_seed.jsonl").read().splitlines()[:8]
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = train_pref.Config(data=str(data), eval_data=str(data), eval_every=3, out_dir=str(tmp_path / "run"),
                            max_steps=3, batch_size=8, lr=1e-5, warmup_ratio=0.0, max_length=160, loss=loss)
    train_pref.main(cfg)
    first, last = rows(tmp_path / "run")[0], rows(tmp_path / "run")[-1]
    assert last["eval/rewards/accuracies"] >= 0.875
    assert last["eval/rewards/margins"] > 0
    assert last["eval/logps/rejected"] < first["logps/rejected"]


def readme_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section that starts at the line `heading`."""
    text = open("README.md").read()
    start = text.find("\n" + heading + "\n")
    assert start >= 0, f"README.md has no section {heading!r}"
    section = text[start + len(heading) + 2:].split("\n## ")[0]
    return re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)


def test_readme_add_a_loss(tiny_dir, tmp_path, monkeypatch):
    """The README's "Adding a loss" blocks, run as written: the first as if pasted into porover/losses.py,
    the second as train_pref.py's Config. `--loss odpo` then trains, its flag parses, its default is
    the function's, its check and the rule on options other losses do not take hold, and its step-0 loss
    is the documented log(1 + e^delta) (1.313262 at delta 1)."""
    loss_block, flag_block = readme_blocks("## Adding a loss")[:2]
    table = dict(losses.PREFERENCE_LOSSES)
    monkeypatch.setattr(train_pref, "PREFERENCE_LOSSES", table)
    exec(loss_block, {**vars(losses), "PREFERENCE_LOSSES": table})
    with pytest.raises(ValueError, match="loss options without a flag: add odpo_offset to train_pref.Config"):
        train_pref.loss_options(train_pref.Config(loss="odpo"))
    namespace = {"dataclass": dataclasses.dataclass, "TrainConfig": train_pref.Config}
    exec(flag_block, namespace)
    monkeypatch.setattr(train_pref, "Config", namespace["Config"])
    assert train_pref.parse(train_pref.Config, ["--loss", "odpo", "--odpo_offset", "1.0"]).odpo_offset == 1.0
    assert train_pref.loss_options(train_pref.Config(loss="odpo"))["odpo_offset"] == 0.5
    for kw, match in ((dict(loss="dpo", odpo_offset=1.0), "--odpo_offset is not used by --loss dpo"),
                      (dict(loss="odpo", odpo_offset=-1.0), "--odpo_offset must be non-negative"),
                      (dict(loss="odpo", simpo_gamma=1.0), "--simpo_gamma is not used by --loss odpo")):
        with pytest.raises(ValueError, match=match):
            train_pref.loss_options(train_pref.Config(**kw))
    model = str(tmp_path / "m")
    tiny_llama(dropout=0.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(model)
    data = write_pairs(tmp_path / "p.jsonl", PAIRS)
    train_pref.main(base_cfg(model, data, tmp_path / "run", loss="odpo", odpo_offset=1.0))
    assert rows(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(1 + math.e), abs=1e-6)


def test_bf16_on_cpu_step_zero_is_ln2(tiny_dir, tmp_path, monkeypatch):
    """--dtype bf16 on CPU (DDP path, one process): policy and reference run the same bf16-autocast forward
    (their logits are bf16), so DPO's first loss is ln 2 within bf16's relative precision (2^-8)."""
    dtypes = set()

    def recording_token_logps(logits, *args):
        dtypes.add(logits.dtype)
        return losses.token_logps(logits, *args)
    monkeypatch.setattr(reference, "token_logps", recording_token_logps)
    model = str(tmp_path / "m")
    tiny_llama(dropout=0.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(model)
    data = write_pairs(tmp_path / "p.jsonl", PAIRS)
    train_pref.main(base_cfg(model, data, tmp_path / "run", dtype="bf16", strategy="ddp", max_steps=2))
    assert dtypes == {torch.bfloat16}
    assert json.loads((tmp_path / "run/config.json").read_text())["dtype"] == "bf16"
    first, second = rows(tmp_path / "run")
    assert first["loss"] == pytest.approx(math.log(2), rel=2 ** -8) and second["loss"] < first["loss"]


def test_policy_dropout_is_off_so_step_zero_is_exact(tiny_dir, tmp_path):
    """The tiny model has attention dropout 0.1: the policy must not apply it, or h != 0 at step 0. At the
    default beta, POROver's 0.025 (ln 2 at step 0 for any beta); config.json records the resolved values."""
    data = write_pairs(tmp_path / "p.jsonl", PAIRS)
    train_pref.main(base_cfg(tiny_dir, data, tmp_path / "run"))
    first = rows(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(first["rewards/chosen"]) < 1e-6
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["loss_options"]["beta"] == 0.025 and config["global_batch"] == 2
    assert {k: config["config"][k] for k in ("grad_accum", "global_batch", "min_lr", "weight_decay")} == \
        {"grad_accum": 1, "global_batch": 2, "min_lr": 1e-6, "weight_decay": 0.01}


def test_paper_defaults():
    """POROver's DPO: lr 1.25e-6, beta 0.025 (other losses keep theirs); the cosine's default floor 1e-6 is
    capped at a lower --lr, while an explicit one above --lr is an error."""
    cfg = train_pref.Config()
    assert (cfg.lr, cfg.weight_decay, train_pref.loss_options(cfg)["beta"]) == (1.25e-6, 0.01, 0.025)
    assert train_pref.loss_options(train_pref.Config(loss="ipo"))["beta"] == 0.1
    assert train_pref.resolve(train_pref.Config(lr=5e-7), 1).min_lr == 5e-7
    with pytest.raises(ValueError, match="--min_lr 1e-06 must be in"):
        train_pref.loss_options(train_pref.Config(lr=5e-7, min_lr=1e-6))


def test_val_size_holds_out_pairs_with_their_reference(tiny_dir, tmp_path):
    """--val_size 2 of 6 pairs with --precompute_ref: 4 train, 2 evaluated, both counted in config.json. At lr
    1e-12 the policy stays the reference, so the eval loss is ln 2 (to 1e-4, precomputed at other batching)
    only if the held-out pairs got their own reference log-probs."""
    data = write_pairs(tmp_path / "p.jsonl", [{**r, "prompt": f"{r['prompt']} ({i})"} for i in range(3) for r in PAIRS])
    train_pref.main(base_cfg(tiny_dir, data, tmp_path / "run", val_size=2, precompute_ref=True, lr=1e-12))
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert (config["train_examples"], config["eval_examples"]) == (4, 2)
    (row,) = rows(tmp_path / "run")
    assert row["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_precomputed_at_other_batching_step_zero(tiny_dir, tmp_path):
    """Pairs of uneven length; the reference precomputed one pair at a time (no padding), training at batch 3
    (padded): DPO's first loss is ln 2 to 1e-4 (the reference's log-probs differ from the policy's by
    float summation order only)."""
    model = str(tmp_path / "m")
    tiny_llama(dropout=0.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(model)
    extra = {"prompt": "Explain how to kill weeds without harming my lawn, in detail please.",
             "chosen": "Pull them by hand after rain, or spot-treat with a selective herbicide.", "rejected": "No."}
    data = write_pairs(tmp_path / "p.jsonl", PAIRS + [extra])
    train_pref.main(base_cfg(model, data, tmp_path / "run", batch_size=3, precompute_ref=True, ref_batch_size=1))
    assert rows(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_different_conversations_in_chosen_and_rejected_are_an_error(tmp_path):
    a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    b = [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "no"}]
    with pytest.raises(DataError, match=r"p\.jsonl:1: fields 'chosen' and 'rejected' carry different"):
        read_pref(write_pairs(tmp_path / "p.jsonl", [{"chosen": a, "rejected": b}]))


def test_ref_offload_needs_fsdp_an_online_reference_and_a_gpu(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl", PAIRS)
    with pytest.raises(ValueError, match="--ref_offload needs --strategy fsdp"):
        train_pref.main(base_cfg(tiny_dir, data, tmp_path / "a", ref_offload=True))
    with pytest.raises(ValueError, match="--ref_offload needs --strategy fsdp and an online reference"):
        train_pref.main(base_cfg(tiny_dir, data, tmp_path / "b", ref_offload=True, strategy="fsdp", precompute_ref=True))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="on CPU it is moot"):
            train_pref.main(base_cfg(tiny_dir, data, tmp_path / "c", ref_offload=True, strategy="fsdp"))
