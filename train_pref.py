"""Preference optimisation (DPO, IPO, hinge, robust DPO, SimPO; optional NLL term) against a frozen
reference model, the last stage of POROver.

    python train_pref.py --data pairs.jsonl --model runs/sft/final --loss dpo --out_dir runs/dpo
    torchrun --standalone --nproc_per_node=2 train_pref.py ... --precompute_ref

The loss is the mean over the global batch of pairs (batch_size x grad_accum x world size pairs, or
--global_batch). Defaults follow POROver's DPO recipe (lr 1.25e-6, beta 0.025, cosine to 1e-6). The
reference is the SFT model itself by default: computed online in the same forward code path, or once
before training with --precompute_ref (then freed).
"""
import dataclasses
import gc
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from porover import chat, dist, models, reference
from porover.config import parse
from porover.data import format_counts, read_pref
from porover.losses import PREFERENCE_LOSSES, nll_term
from porover.parallel import decoder_layers, disable_dropout, flops_per_token, grad_sync, precision, shard, wrap
from porover.training import (TrainConfig, adamw, config_errors, finish, global_batch, hold_out, lr_at, optimizer_step,
                              plan, resolve, save_and_export, speed, start)


@dataclass
class Config(TrainConfig):
    """Preference optimisation on prompt/chosen/rejected JSONL (shared flags: porover.training)."""
    data: str = "data/demo/pairs_seed.jsonl"
    out_dir: str = "runs/pref"
    lr: float = 1.25e-6
    warmup_ratio: float = 0.1
    loss: str = "dpo"  # a name in porover.losses.PREFERENCE_LOSSES
    # The losses' options: None means the chosen loss's own default (its signature in porover.losses);
    # setting an option the loss does not take is an error.
    beta: float | None = None
    logp_agg: Literal["sum", "mean"] | None = None
    label_smoothing: float | None = None
    simpo_gamma: float | None = None
    nll_weight: float = 0.0
    ref_model: str | None = None  # default: --model (the SFT model)
    precompute_ref: bool = False
    ref_batch_size: int | None = None  # precompute batch; default 2 x batch_size
    ref_offload: bool = False  # FSDP2: keep the online reference's shards in CPU memory


def loss_options(cfg: Config) -> dict:
    """The chosen loss's options (porover.losses.PreferenceLoss.options) from the flags, or every error in
    the config at once: those of the loss's options, and the trainer's own."""
    if cfg.loss not in PREFERENCE_LOSSES:
        raise ValueError(f"--loss {cfg.loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}")
    names = {k for loss in PREFERENCE_LOSSES.values() for k in loss.defaults}
    if missing := sorted(names - {f.name for f in dataclasses.fields(cfg)}):
        raise ValueError(f"loss options without a flag: add {', '.join(missing)} to train_pref.Config (default None)")
    loss = PREFERENCE_LOSSES[cfg.loss]
    opts, loss_errors = loss.options(cfg.loss, {k: getattr(cfg, k) for k in sorted(names)})
    if errors := config_errors(cfg) + loss_errors + reference_errors(cfg, loss.reference_free):
        raise ValueError("invalid config: " + "; ".join(errors))
    return opts


def reference_errors(cfg: Config, reference_free: bool) -> list[str]:
    """The reference and NLL flags that contradict each other, the loss, or the device."""
    errors = []
    if reference_free and (cfg.ref_model or cfg.precompute_ref):
        errors.append(f"--loss {cfg.loss} is reference-free: --ref_model and --precompute_ref do not apply")
    if cfg.ref_batch_size is not None and not cfg.precompute_ref:
        errors.append("--ref_batch_size needs --precompute_ref")
    if cfg.ref_batch_size is not None and cfg.ref_batch_size < 1:
        errors.append("--ref_batch_size must be at least 1")
    if cfg.nll_weight < 0:
        errors.append("--nll_weight must be non-negative (it adds the chosen answer's NLL)")
    if cfg.ref_offload and (cfg.strategy != "fsdp" or cfg.precompute_ref or reference_free):
        errors.append("--ref_offload needs --strategy fsdp and an online reference")
    elif cfg.ref_offload and not torch.cuda.is_available():
        errors.append("--ref_offload keeps the reference's shards in CPU memory off the GPU; on CPU it is moot")
    return errors


def load_pairs(path, tokenizer, eot_id, cfg, name):
    examples, skipped = read_pref(path)
    pairs, counts = chat.tokenize_pairs(tokenizer, eot_id, examples, cfg.max_length, cfg.max_prompt_length)
    counts.update(skipped)
    dist.print0(f"{name}: {len(pairs)} pairs from {path}; skipped/truncated: {format_counts(counts)}")
    if not pairs:
        raise ValueError(f"{path}: no usable pairs ({format_counts(counts)})")
    for p in pairs:
        p["key"] = reference.pair_key(p, cfg.max_length, cfg.max_prompt_length)
    return pairs, dict(counts)


def load_data(cfg, tokenizer, eot_id, world):
    """(training pairs, eval pairs (maybe none), their counts for config.json): the eval set is --eval_data,
    or --val_size pairs held out of --data."""
    pairs, counts = load_pairs(cfg.data, tokenizer, eot_id, cfg, "train")
    eval_pairs, eval_counts = load_pairs(cfg.eval_data, tokenizer, eot_id, cfg, "eval") if cfg.eval_data else ([], {})
    pairs, held = hold_out(pairs, cfg, world)  # held: None without --val_size
    eval_pairs = held or eval_pairs
    return pairs, eval_pairs, {"train_counts": counts, "eval_counts": eval_counts, "train_examples": len(pairs),
                               "eval_examples": len(eval_pairs)}


def stand_in(pair):
    """A fully masked pair (weight 0) for a rank whose share of a short last batch is empty."""
    blank = {"input_ids": pair["chosen"]["input_ids"][:2], "loss_mask": [0, 0]}
    return {"chosen": blank, "rejected": blank, "ref": torch.zeros(2), "weight": 0.0}


def collate(pairs, pad_id):
    batch = chat.collate_pairs(pairs, pad_id)
    batch["weight"] = torch.tensor([p.get("weight", 1.0) for p in pairs])           # (B,)
    if "ref" in pairs[0]:
        batch["ref"] = torch.stack([p["ref"] for p in pairs]).float()               # (B, 2) summed
    return batch


def pair_losses(policy, ref_model, batch, opts, cfg, autocast):
    """Per-pair losses (B,) and the statistics to log, from one concatenated forward of the policy."""
    loss = PREFERENCE_LOSSES[cfg.loss]
    sums, counts = reference.sequence_stats(policy, batch, autocast)              # (2B,), (2B,)
    mean = opts["logp_agg"] == "mean"
    logps = sums / counts.clamp(min=1) if mean else sums
    chosen, rejected = logps.chunk(2)                                             # (B,), (B,)
    if loss.reference_free:
        ref_chosen = ref_rejected = None
    else:
        if ref_model is not None:  # online: same code path, eval mode, no graph
            with torch.no_grad():
                ref_sums = reference.sequence_stats(ref_model, batch, autocast)[0]
        else:
            ref_sums = batch["ref"].T.reshape(-1)                                 # (2B,)
        ref_logps = ref_sums / counts.clamp(min=1) if mean else ref_sums
        ref_chosen, ref_rejected = ref_logps.chunk(2)
    kwargs = {k: v for k, v in opts.items() if k != "logp_agg"}  # logp_agg was used above
    losses = loss.fn(chosen, rejected, ref_chosen, ref_rejected, **kwargs)
    if cfg.nll_weight:
        losses = losses + cfg.nll_weight * nll_term((sums / counts.clamp(min=1)).chunk(2)[0])
    # Rewards are beta x (log pi - log ref) from the log-probs the loss used (beta x log pi when ref-free).
    reward_chosen = opts["beta"] * (chosen - (ref_chosen if ref_chosen is not None else 0)).detach()
    reward_rejected = opts["beta"] * (rejected - (ref_rejected if ref_rejected is not None else 0)).detach()
    len_chosen, len_rejected = counts.chunk(2)
    w = batch["weight"]
    stats = {"rewards/chosen": reward_chosen, "rewards/rejected": reward_rejected,
             "rewards/margins": reward_chosen - reward_rejected,
             "rewards/accuracies": (reward_chosen > reward_rejected).float(),
             "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
             "length/chosen": len_chosen.float(), "length/rejected": len_rejected.float()}
    return losses * w, {k: (v * w).sum().item() for k, v in stats.items()}


def accumulate(model, ref_model, batches, global_pairs, world, opts, cfg, autocast, device):
    """Forward and backward over this rank's micro-batches; returns sums of loss and statistics."""
    totals = {}
    for m, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with grad_sync(model, last=m == len(batches) - 1):
            losses, stats = pair_losses(model, ref_model, batch, opts, cfg, autocast)
            loss = losses.sum() / global_pairs
            (loss * world).backward()  # DDP and FSDP2 average over ranks: scale back to the global sum
        for k, v in {"loss": loss.item() * global_pairs, **stats}.items():
            totals[k] = totals.get(k, 0.0) + v
    return totals


@torch.no_grad()
def evaluate(model, ref_model, pairs, opts, cfg, collate_fn, device, autocast) -> dict:
    """Held-out preference metrics (eval/ keys); every rank runs the same number of forwards."""
    model.eval()
    mine, world = pairs[dist.rank()::dist.world_size()], dist.world_size()
    totals = {}
    for b in range(-(-len(pairs) // (world * cfg.batch_size))):
        part = mine[b * cfg.batch_size:(b + 1) * cfg.batch_size] or [stand_in(pairs[0])]
        batch = {k: v.to(device) for k, v in collate_fn(part).items()}
        losses, stats = pair_losses(model, ref_model, batch, opts, cfg, autocast)
        for k, v in {"loss": losses.sum().item(), **stats}.items():
            totals[k] = totals.get(k, 0.0) + v
    model.train()
    keys = sorted(totals)
    sums = dist.all_reduce_sum([totals[k] for k in keys], device)
    return {f"eval/{k}": v / len(pairs) for k, v in zip(keys, sums)}


def reference_model(cfg: Config, tokenizer, dtype, device):
    """The frozen reference (None for a reference-free loss) and, with --precompute_ref, its fingerprint.
    The same weights as the policy by default, eval mode (dropout off), same dtype and forward code path,
    so that at step 0 the policy and the reference agree exactly."""
    if PREFERENCE_LOSSES[cfg.loss].reference_free:
        return None, None
    ref_model = models.load_model(cfg.ref_model or cfg.model, dtype=torch.float32).eval()
    ref_model.requires_grad_(False)
    fingerprint = None
    if cfg.precompute_ref:  # of the loaded weights, before compiling or sharding changes the module
        fingerprint = reference.fingerprint(ref_model, tokenizer, dtype, cfg.strategy, device.type)
    if cfg.compile:  # the same kernels as the policy, so that the two agree at step 0
        for layer in decoder_layers(ref_model):
            layer.compile()
    if not cfg.ref_offload:
        ref_model.to(device)
    if cfg.strategy == "fsdp":
        ref_model = shard(ref_model, dtype, offload=cfg.ref_offload)
    return ref_model, fingerprint


def attach_reference(ref_model, fingerprint, pairs, cfg: Config, collate_fn, device, autocast):
    """--precompute_ref: every pair gets "ref", its (chosen, rejected) summed reference log-probs, from the
    cache in out_dir/ref_logps where present."""
    cache = Path(cfg.out_dir) / "ref_logps" / f"{fingerprint}.safetensors"
    ref, _ = reference.precompute(ref_model, pairs, [p["key"] for p in pairs], cache,
                                  cfg.ref_batch_size or 2 * cfg.batch_size, collate_fn, device, autocast)
    for p, r in zip(pairs, ref):
        p["ref"] = r


def train_step(model, ref_model, optimizer, lr, batches, real, consumed, opts, cfg, autocast, device):
    """One optimizer step on a global batch of `consumed` pairs: the loss, gradient norm and statistics
    (global-batch means) for the metrics row, and the non-pad tokens the policy saw on all ranks."""
    local_seen = sum(b["attention_mask"].sum().item() for b, r in zip(batches, real) if r)
    totals = accumulate(model, ref_model, batches, consumed, dist.world_size(), opts, cfg, autocast, device)
    grad_norm = optimizer_step(model, optimizer, lr, cfg.max_grad_norm)
    keys = sorted(totals)
    sums = dist.all_reduce_sum([totals[k] for k in keys] + [local_seen], device)
    return {"grad_norm": grad_norm, **{k: v / consumed for k, v in zip(keys, sums)}}, sums[-1]


def main(cfg: Config):
    opts = loss_options(cfg)
    rank, world, device = dist.setup(process_group=cfg.strategy == "fsdp")
    cfg = resolve(cfg, world)
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype, autocast = precision(cfg, device)

    tokenizer = models.load_tokenizer(cfg.model)
    eot_id = chat.prepare_tokenizer(tokenizer, cfg.chat_template)
    pairs, eval_pairs, counts = load_data(cfg, tokenizer, eot_id, world)
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    ref_model, fingerprint = reference_model(cfg, tokenizer, dtype, device)
    if ref_model is not None and cfg.precompute_ref:
        attach_reference(ref_model, fingerprint, pairs + eval_pairs, cfg, collate_fn, device, autocast)
        ref_model = None  # freed before training: precomputing is for the memory and the time
        gc.collect()

    # Dropout off in the policy too: with it, log pi and log ref differ at step 0 by noise, and h is biased.
    policy = disable_dropout(models.load_model(cfg.model, dtype=torch.float32))
    model = wrap(policy.to(device), cfg, device, world, dtype)  # fp32 master weights
    optimizer = adamw(model, cfg, device)
    global_batch_size, max_steps, warmup_steps = plan(cfg, len(pairs), world)
    step, samples_seen, meta, metrics = start(cfg, model, optimizer, world, device, dtype, {
        "loss_options": opts, "max_steps": max_steps, "global_batch": global_batch_size, "warmup_steps": warmup_steps,
        **counts})
    dist.print0(f"global batch {global_batch_size} pairs = {cfg.batch_size} per device x {cfg.grad_accum} accumulation "
                f"x {world} processes; {len(pairs)} pairs, {max_steps} steps, {cfg.loss} {opts}, {dtype} on {device}")
    lengths = [len(p["chosen"]["input_ids"]) + len(p["rejected"]["input_ids"]) for p in pairs]
    flops_token = flops_per_token(model, online_reference=ref_model is not None)
    bar = tqdm(total=max_steps, initial=step, disable=rank != 0, desc=cfg.loss, dynamic_ncols=True)

    while step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, max_steps, cfg.lr, warmup_steps, cfg.min_lr)
        batches, real, consumed, epoch = global_batch(pairs, lengths, samples_seen, cfg, rank, world, collate_fn,
                                                      stand_in)
        stats, tokens = train_step(model, ref_model, optimizer, lr, batches, real, consumed, opts, cfg, autocast,
                                   device)
        samples_seen += consumed
        step += 1
        row = {"step": step, "lr": lr, **stats, **speed(tokens, time.perf_counter() - t0, world, flops_token),
               "epoch": epoch}
        if eval_pairs and (step == max_steps or cfg.eval_every and step % cfg.eval_every == 0):
            row.update(evaluate(model, ref_model, eval_pairs, opts, cfg, collate_fn, device, autocast))
        metrics.write(row, bar, log=step % cfg.log_every == 0)
        save_and_export(cfg, step, max_steps, model, optimizer, tokenizer, samples_seen, meta)
    finish(model, tokenizer, out, step, meta, bar)


if __name__ == "__main__":
    record(main)(parse(Config))  # a failing rank's traceback reaches torchrun's report
