"""Supervised fine-tuning of the student on (overgenerated) teacher data.

    python train_sft.py --data data/demo/sft_seed.jsonl --out_dir runs/sft
    torchrun --standalone --nproc_per_node=2 train_sft.py --strategy ddp ...

The loss is the mean negative log-likelihood over all response tokens of the global batch
(porover.losses.sft_loss). Global batch = batch_size x grad_accum x world size, or --global_batch with
grad_accum derived. Defaults follow POROver's recipe (lr 1e-5, cosine to 1e-6, weight decay 0.01).
"""
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from porover import chat, dist, models
from porover.config import parse
from porover.data import format_counts, read_sft
from porover.losses import sft_loss
from porover.parallel import flops_per_token, grad_sync, precision, wrap
from porover.training import (TrainConfig, adamw, config_errors, finish, global_batch, hold_out, lr_at, optimizer_step,
                              plan, resolve, save_and_export, speed, start)


@dataclass
class Config(TrainConfig):
    """SFT of a causal LM on prompt/response JSONL (flags shared with train_pref.py: porover.training)."""
    data: str = "data/demo/sft_seed.jsonl"
    out_dir: str = "runs/sft"


def load_split(path, tokenizer, eot_id, cfg, name):
    examples, skipped = read_sft(path)
    items, counts = chat.tokenize_sft(tokenizer, eot_id, examples, cfg.max_length, cfg.max_prompt_length)
    counts.update(skipped)
    dist.print0(f"{name}: {len(items)} examples from {path}; skipped/truncated: {format_counts(counts)}")
    if not items:
        raise ValueError(f"{path}: no usable examples ({format_counts(counts)})")
    return items, dict(counts)


def load_data(cfg, tokenizer, eot_id, world):
    """(training items, eval items or None, their counts for config.json): the eval set is --eval_data, or
    --val_size examples held out of --data."""
    train_items, train_counts = load_split(cfg.data, tokenizer, eot_id, cfg, "train")
    eval_items, eval_counts = load_split(cfg.eval_data, tokenizer, eot_id, cfg, "eval") if cfg.eval_data else (None, {})
    train_items, held = hold_out(train_items, cfg, world)  # held: None without --val_size
    eval_items = held or eval_items
    return train_items, eval_items, {"train_counts": train_counts, "eval_counts": eval_counts,
                                     "train_examples": len(train_items), "eval_examples": len(eval_items or [])}


def forward_nll(model, batch, autocast):
    """Summed token NLL of one micro-batch (fp32) and its response-token count."""
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return sft_loss(logits, batch["input_ids"], batch["loss_mask"], num_tokens=1)


def stand_in(item):
    """A fully masked micro-batch for a rank whose share of a short last batch is empty."""
    return {"input_ids": item["input_ids"][:2], "loss_mask": [0, 0]}


def accumulate(model, batches, global_tokens, world, autocast, device) -> float:
    """Forward and backward over this rank's micro-batches; returns its share of the global-batch loss."""
    loss_sum = 0.0
    for m, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with grad_sync(model, last=m == len(batches) - 1):
            loss = forward_nll(model, batch, autocast) / global_tokens
            # DDP and FSDP2 average gradients over ranks; scaling by the world size makes that the global sum.
            (loss * world).backward()
        loss_sum += loss.item()
    return loss_sum


@torch.no_grad()
def evaluate(model, items, cfg, pad_id, device, autocast):
    """Token-mean NLL over the eval set; every rank runs the same number of forwards."""
    model.eval()
    rank, world = dist.rank(), dist.world_size()
    mine = items[rank::world]
    n_batches = -(-len(items) // (world * cfg.batch_size))
    nll = tokens = 0.0
    for b in range(n_batches):
        part = mine[b * cfg.batch_size:(b + 1) * cfg.batch_size] or [stand_in(items[0])]
        batch = {k: v.to(device) for k, v in chat.collate(part, pad_id).items()}
        nll += forward_nll(model, batch, autocast).item()
        tokens += batch["loss_mask"][:, 1:].sum().item()
    model.train()
    nll, tokens = dist.all_reduce_sum([nll, tokens], device)
    return nll / tokens


def train_step(model, optimizer, lr, batches, real, cfg, autocast, device) -> tuple[dict, float]:
    """One optimizer step on a global batch: its loss and gradient norm for the metrics row, and the non-pad
    tokens of its real examples on all ranks."""
    # Normalise by the response tokens of the whole global batch (all micro-steps, all ranks).
    local_tokens = sum(b["loss_mask"][:, 1:].sum().item() for b in batches)
    local_seen = sum(b["attention_mask"].sum().item() for b, r in zip(batches, real) if r)
    global_tokens = dist.all_reduce_sum([local_tokens], device)[0]
    loss_sum = accumulate(model, batches, global_tokens, dist.world_size(), autocast, device)
    grad_norm = optimizer_step(model, optimizer, lr, cfg.max_grad_norm)
    loss_sum, seen = dist.all_reduce_sum([loss_sum, local_seen], device)
    return {"loss": loss_sum, "grad_norm": grad_norm}, seen


def main(cfg: Config):
    if errors := config_errors(cfg):
        raise ValueError("invalid config: " + "; ".join(errors))
    rank, world, device = dist.setup(process_group=cfg.strategy == "fsdp")
    cfg = resolve(cfg, world)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; the data order does not use this RNG
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype, autocast = precision(cfg, device)

    tokenizer = models.load_tokenizer(cfg.model)
    eot_id = chat.prepare_tokenizer(tokenizer, cfg.chat_template)
    train_items, eval_items, counts = load_data(cfg, tokenizer, eot_id, world)

    model = wrap(models.load_model(cfg.model, dtype=torch.float32).to(device), cfg, device, world, dtype)  # fp32 master
    optimizer = adamw(model, cfg, device)
    global_batch_size, max_steps, warmup_steps = plan(cfg, len(train_items), world)
    step, samples_seen, meta, metrics = start(cfg, model, optimizer, world, device, dtype, {
        "max_steps": max_steps, "global_batch": global_batch_size, "warmup_steps": warmup_steps, **counts})
    dist.print0(f"global batch {global_batch_size} = {cfg.batch_size} per device x {cfg.grad_accum} accumulation x "
                f"{world} processes; {len(train_items)} examples, {max_steps} steps, {dtype} on {device}")
    lengths = [len(it["input_ids"]) for it in train_items]
    collate = partial(chat.collate, pad_id=tokenizer.pad_token_id)
    flops_token = flops_per_token(model, online_reference=False)
    bar = tqdm(total=max_steps, initial=step, disable=rank != 0, desc="sft", dynamic_ncols=True)

    while step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, max_steps, cfg.lr, warmup_steps, cfg.min_lr)
        batches, real, consumed, epoch = global_batch(train_items, lengths, samples_seen, cfg, rank, world,
                                                      collate, stand_in)
        stats, tokens = train_step(model, optimizer, lr, batches, real, cfg, autocast, device)
        samples_seen += consumed
        step += 1
        row = {"step": step, "lr": lr, **stats, **speed(tokens, time.perf_counter() - t0, world, flops_token),
               "epoch": epoch}
        if eval_items is not None and (step == max_steps or cfg.eval_every and step % cfg.eval_every == 0):
            row["eval/loss"] = evaluate(model, eval_items, cfg, tokenizer.pad_token_id, device, autocast)
        metrics.write(row, bar, log=step % cfg.log_every == 0)
        save_and_export(cfg, step, max_steps, model, optimizer, tokenizer, samples_seen, meta)
    finish(model, tokenizer, out, step, meta, bar)


if __name__ == "__main__":
    record(main)(parse(Config))  # a failing rank's traceback reaches torchrun's report
