"""Supervised fine-tuning of the student on (overgenerated) teacher data.

    python train_sft.py --data data/demo/sft_seed.jsonl --out_dir runs/sft
    torchrun --standalone --nproc_per_node=2 train_sft.py --strategy ddp ...

The loss is the mean negative log-likelihood over all response tokens of the global batch
(porover.losses.sft_loss). Global batch = batch_size x grad_accum x world size.
"""
import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from porover import chat, checkpoint, dist, models
from porover.config import parse, provenance, write_json
from porover.data import format_counts, read_sft
from porover.losses import sft_loss
from porover.training import MetricsFile, global_batch, lr_at, steps_per_epoch


@dataclass
class Config:
    """SFT of a causal LM on prompt/response JSONL."""
    model: str = "smollm2-135m"
    data: str = "data/demo/sft_seed.jsonl"
    eval_data: str | None = None
    out_dir: str = "runs/sft"
    chat_template: str | None = None  # None: the tokenizer's own; "chatml" or a file for base models
    max_length: int = 512
    max_prompt_length: int | None = None  # longer prompts keep their end; None: never cut a prompt
    epochs: int | None = None  # default 1 when --max_steps is not given
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    group_by_length: bool = False
    seed: int = 1337
    dtype: Literal["bf16", "fp32"] | None = None  # None: bf16 autocast on CUDA, fp32 on CPU
    strategy: Literal["ddp"] = "ddp"
    grad_checkpointing: bool = False
    eval_every: int | None = None
    save_every: int | None = None
    export_every: int | None = None
    keep_last: int | None = None
    resume: bool = False
    log_every: int = 1


def validate(cfg: Config):
    errors = []
    if cfg.epochs is not None and cfg.max_steps is not None:
        errors.append("give --epochs or --max_steps, not both")
    if cfg.eval_every is not None and cfg.eval_data is None:
        errors.append("--eval_every needs --eval_data")
    if cfg.keep_last is not None and cfg.save_every is None:
        errors.append("--keep_last needs --save_every")
    if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length - 1:
        errors.append("--max_prompt_length must leave room for a response within --max_length")
    for k in ("batch_size", "grad_accum", "max_length", "epochs", "max_steps", "eval_every", "save_every",
              "export_every", "keep_last", "log_every"):
        if getattr(cfg, k) is not None and getattr(cfg, k) < 1:
            errors.append(f"--{k} must be at least 1")
    if not 0 <= cfg.warmup_ratio < 1:
        errors.append("--warmup_ratio must be in [0, 1)")
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))


def load_split(path, tokenizer, eot_id, cfg, name):
    examples, skipped = read_sft(path)
    items, counts = chat.tokenize_sft(tokenizer, eot_id, examples, cfg.max_length, cfg.max_prompt_length)
    counts.update(skipped)
    dist.print0(f"{name}: {len(items)} examples from {path}; skipped/truncated: {format_counts(counts)}")
    if not items:
        raise ValueError(f"{path}: no usable examples ({format_counts(counts)})")
    return items, dict(counts)


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
        # Only the last micro-step needs DDP's gradient all-reduce (nanoGPT does the same).
        sync = nullcontext() if world == 1 or m == len(batches) - 1 else model.no_sync()
        with sync:
            loss = forward_nll(model, batch, autocast) / global_tokens
            # DDP averages gradients over ranks; scaling by the world size turns that into the global sum.
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


def main(cfg: Config):
    validate(cfg)
    rank, world, device = dist.setup()
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; the data order does not use this RNG
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    resume_from = checkpoint.latest(ckpt_root) if cfg.resume else None
    if cfg.resume and resume_from is None:
        dist.print0(f"--resume: no complete checkpoint in {ckpt_root}, starting from scratch")
    dtype = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    tokenizer = models.load_tokenizer(cfg.model)
    eot_id = chat.prepare_tokenizer(tokenizer, cfg.chat_template)
    train_items, train_counts = load_split(cfg.data, tokenizer, eot_id, cfg, "train")
    eval_items = load_split(cfg.eval_data, tokenizer, eot_id, cfg, "eval")[0] if cfg.eval_data else None

    model = models.load_model(cfg.model, dtype=torch.float32).to(device)  # fp32 master weights
    if cfg.grad_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")

    global_batch_size = cfg.batch_size * cfg.grad_accum * world
    n = len(train_items)
    max_steps = cfg.max_steps or (cfg.epochs or 1) * steps_per_epoch(n, global_batch_size)
    warmup_steps = int(cfg.warmup_ratio * max_steps)
    config = dataclasses.asdict(cfg)
    step, samples_seen = 0, 0
    if resume_from is not None:
        state = json.loads((resume_from / "state.json").read_text())
        checkpoint.check_config(state["config"], config)
        state = checkpoint.load(resume_from, model, optimizer)
        step, samples_seen = state["step"], state["samples_seen"]
        dist.print0(f"resumed from {resume_from} at step {step}, global sample {samples_seen}")
    meta = provenance({"data": cfg.data, "eval_data": cfg.eval_data}, seed=cfg.seed, world_size=world,
                      device=str(device), dtype=dtype)
    if rank == 0:
        write_json(out / "config.json", {"config": config, "max_steps": max_steps, "global_batch": global_batch_size,
                                         "warmup_steps": warmup_steps, "train_counts": train_counts, **meta})
    dist.print0(f"global batch {global_batch_size} = {cfg.batch_size} per device x {cfg.grad_accum} accumulation x "
                f"{world} processes; {n} examples, {max_steps} steps, {dtype} on {device}")
    metrics = MetricsFile(out / "metrics.jsonl", step if resume_from else None, rank == 0)
    lengths = [len(it["input_ids"]) for it in train_items]
    collate = partial(chat.collate, pad_id=tokenizer.pad_token_id)
    bar = tqdm(total=max_steps, initial=step, disable=rank != 0, desc="sft", dynamic_ncols=True)

    while step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, max_steps, cfg.lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches, real, consumed, epoch = global_batch(train_items, lengths, samples_seen, cfg, rank, world,
                                                      collate, stand_in)
        # Normalise by the response tokens of the whole global batch (all micro-steps, all ranks).
        local_tokens = sum(b["loss_mask"][:, 1:].sum().item() for b in batches)
        local_seen = sum(b["attention_mask"].sum().item() for b, r in zip(batches, real) if r)
        global_tokens = dist.all_reduce_sum([local_tokens], device)[0]
        loss_sum = accumulate(model, batches, global_tokens, world, autocast, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples_seen += consumed
        step += 1
        loss_sum, seen = dist.all_reduce_sum([loss_sum, local_seen], device)
        step_time = time.perf_counter() - t0
        row = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": seen / step_time,
               "tokens_per_sec_per_device": seen / step_time / world, "step_time": step_time, "epoch": epoch}
        if eval_items is not None and (step % cfg.eval_every == 0 or step == max_steps):
            row["eval/loss"] = evaluate(model, eval_items, cfg, tokenizer.pad_token_id, device, autocast)
        metrics.write(row)
        bar.update(1)
        if step % cfg.log_every == 0 and rank == 0:
            bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if cfg.save_every and (step % cfg.save_every == 0 or step == max_steps):
            checkpoint.save(ckpt_root, step, model, optimizer, {"samples_seen": samples_seen, "config": config},
                            cfg.keep_last)
        if cfg.export_every and step % cfg.export_every == 0 and step < max_steps:
            checkpoint.export(model, tokenizer, out / "exports" / f"step_{step:08d}", {"step": step, **meta})
    bar.close()
    checkpoint.export(model, tokenizer, out / "final", {"step": step, "config": config, **meta})
    dist.print0(f"saved {out / 'final'}")
    dist.teardown()


if __name__ == "__main__":
    main(parse(Config))
