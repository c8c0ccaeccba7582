"""What both trainers share besides parallelism (porover.parallel): the common flags, the learning-rate
schedule, the data order and how each global batch is split over micro-steps and ranks, resuming, and the
metrics file."""
import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from porover import checkpoint, dist
from porover.chat import length_grouped_order
from porover.config import provenance, sha256
from porover.parallel import clip_grad_norm, mfu
from porover.store import cut_torn_line, write_json


@dataclass
class TrainConfig:
    """Flags shared by train_sft.py and train_pref.py (README "Distributed training" for the parallel ones)."""
    model: str = "smollm2-135m"
    data: str = ""
    eval_data: str | None = None
    val_size: int = 0  # hold out this many examples of --data as the eval set (instead of --eval_data)
    out_dir: str = ""
    chat_template: str | None = None  # None: the tokenizer's own; "chatml" or a file for base models
    max_length: int = 512
    max_prompt_length: int | None = None  # longer prompts keep their end; None: never cut a prompt
    epochs: int | None = None  # default 1 when --max_steps is not given
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int | None = None  # None: 1, or what --global_batch leaves
    global_batch: int | None = None  # None: batch_size x grad_accum x world size
    lr: float = 1e-5
    min_lr: float | None = None  # the cosine's floor; None: MIN_LR, or --lr when that is lower
    weight_decay: float = 0.01  # matrices only (see adamw)
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    group_by_length: bool = False
    seed: int = 1337
    dtype: Literal["bf16", "fp32", "fp16"] | None = None  # None: bf16 on CUDA, fp32 on CPU; fp16 is refused
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2, fully_shard per decoder layer, then the root
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer
    eval_every: int | None = None
    save_every: int | None = None
    export_every: int | None = None
    keep_last: int | None = None
    resume: bool = False
    log_every: int = 1


MIN_LR = 1e-6  # the default floor of the cosine schedule (POROver's recipe)


def config_errors(cfg: TrainConfig) -> list[str]:
    """Contradictory or unused settings: each is an error, never a silent no-op."""
    errors = []
    if cfg.epochs is not None and cfg.max_steps is not None:
        errors.append("give --epochs or --max_steps, not both")
    if cfg.eval_every is not None and cfg.eval_data is None and not cfg.val_size:
        errors.append("--eval_every needs --eval_data or --val_size")
    if cfg.val_size and cfg.eval_data is not None:
        errors.append("give --eval_data or --val_size, not both")
    if cfg.val_size < 0:
        errors.append("--val_size must be non-negative")
    if cfg.min_lr is not None and not 0 <= cfg.min_lr <= cfg.lr:
        errors.append(f"--min_lr {cfg.min_lr} must be in [0, --lr {cfg.lr}] (the cosine decays from --lr to it)")
    if cfg.keep_last is not None and cfg.save_every is None:
        errors.append("--keep_last needs --save_every")
    if cfg.max_prompt_length is not None and not 1 <= cfg.max_prompt_length < cfg.max_length - 1:
        errors.append("--max_prompt_length must be at least 1 and leave room for a response within --max_length")
    if not cfg.max_grad_norm > 0:
        errors.append("--max_grad_norm must be positive (0 would zero every update, a negative one reverse it)")
    for k in ("batch_size", "grad_accum", "global_batch", "max_length", "epochs", "max_steps", "eval_every",
              "save_every", "export_every", "keep_last", "log_every"):
        if getattr(cfg, k) is not None and getattr(cfg, k) < 1:
            errors.append(f"--{k} must be at least 1")
    if not 0 <= cfg.warmup_ratio < 1:
        errors.append("--warmup_ratio must be in [0, 1)")
    if cfg.dtype == "fp16":
        errors.append("--dtype fp16 is not supported (it needs loss scaling, which porover does not do): use bf16")
    if cfg.compile and cfg.grad_checkpointing:
        errors.append("--compile with --grad_checkpointing is not supported: choose one")
    return errors


def resolve(cfg: TrainConfig, world: int) -> TrainConfig:
    """The flags whose value follows from others or from the world size, made concrete (grad_accum,
    global_batch, min_lr), so that config.json, checkpoints and a resume record what the run used."""
    grad_accum = cfg.grad_accum or 1
    if cfg.global_batch is not None:
        per_micro_step = cfg.batch_size * world
        if cfg.global_batch % per_micro_step:
            raise ValueError(f"invalid config: --global_batch {cfg.global_batch} is not a multiple of --batch_size "
                             f"{cfg.batch_size} x {world} processes")
        grad_accum = cfg.global_batch // per_micro_step
        if cfg.grad_accum is not None and cfg.grad_accum != grad_accum:
            raise ValueError(f"invalid config: --grad_accum {cfg.grad_accum} makes a global batch of "
                             f"{cfg.grad_accum * per_micro_step} ({cfg.batch_size} x {cfg.grad_accum} x {world} "
                             f"processes), not --global_batch {cfg.global_batch}: leave --grad_accum out to derive it")
    # The default floor must not exceed a low --lr (the schedule would rise); an explicit one is checked.
    min_lr = min(MIN_LR, cfg.lr) if cfg.min_lr is None else cfg.min_lr
    return dataclasses.replace(cfg, grad_accum=grad_accum, global_batch=cfg.batch_size * grad_accum * world,
                               min_lr=min_lr)


def hold_out(items: list, cfg: TrainConfig, world: int) -> tuple[list, list | None]:
    """(training items, eval items or None): --val_size items of --data chosen by --seed alone (not the
    rank or the step), so every rank and every resume holds out the same ones; training keeps the file order."""
    if not cfg.val_size:
        return items, None
    n, k, batch = len(items), cfg.val_size, cfg.batch_size * cfg.grad_accum * world
    if n - k < batch:
        raise ValueError(f"--val_size {k} leaves {n - k} of the {n} usable examples of {cfg.data} for training, "
                         f"fewer than one global batch ({batch})")
    g = torch.Generator().manual_seed(cfg.seed * 100_003 - 1)  # a stream no epoch order uses
    held = set(torch.randperm(n, generator=g)[:k].tolist())
    dist.print0(f"--val_size: {k} of the {n} examples of {cfg.data} held out as the eval set, {n - k} train")
    return [it for i, it in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def adamw(model, cfg: TrainConfig, device):
    """AdamW over the (fp32 master) parameters, betas (0.9, 0.95), fused on CUDA. Weight decay applies to
    matrices (ndim >= 2: linear layers, embeddings) and spares biases and norm weights (1-D), as the HF
    Trainer does: decaying a norm's gain toward 0 shrinks activations, it does not regularise."""
    params = list(model.parameters())  # under FSDP2, DTensors whose ndim is the full tensor's
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda")


def plan(cfg: TrainConfig, n: int, world: int) -> tuple[int, int, int]:
    """(global batch, max_steps, warmup steps) for `n` training examples: --max_steps, else --epochs (1 by
    default) of global batches."""
    global_batch_size = cfg.batch_size * cfg.grad_accum * world
    max_steps = cfg.max_steps or (cfg.epochs or 1) * steps_per_epoch(n, global_batch_size)
    return global_batch_size, max_steps, int(cfg.warmup_ratio * max_steps)


def start(cfg: TrainConfig, model, optimizer, world: int, device, dtype: str, summary: dict):
    """Resume (or start afresh), write out_dir/config.json (`summary` and the provenance) on rank 0 and open
    the metrics file: (step, global sample index, provenance, MetricsFile)."""
    out = Path(cfg.out_dir)
    step, samples_seen, resumed = resume(cfg, model, optimizer)
    meta = provenance({"data": cfg.data, "eval_data": cfg.eval_data}, seed=cfg.seed, world_size=world,
                      device=str(device), dtype=dtype, config=dataclasses.asdict(cfg))
    if dist.rank() == 0:
        write_json(out / "config.json", {**summary, **meta})
    return step, samples_seen, meta, MetricsFile(out / "metrics.jsonl", step if resumed else None, dist.rank() == 0)


def optimizer_step(model, optimizer, lr: float, max_grad_norm: float) -> float:
    """Clip the accumulated gradients, step at learning rate `lr`, clear them; returns the norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = clip_grad_norm(model, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def speed(tokens: float, step_time: float, world: int, flops_token: int) -> dict:
    """The throughput keys of a metrics row, from the non-pad tokens of one global batch (all ranks)."""
    return {"tokens_per_sec": tokens / step_time, "tokens_per_sec_per_device": tokens / step_time / world,
            "step_time": step_time, **mfu(flops_token, tokens, step_time, world)}


def run_config(cfg: TrainConfig, world: int) -> dict:
    """The config a checkpoint records and a resume compares: the flags, the global batch and the training
    data's hash (the same path with other contents would continue from a data position that means nothing)."""
    stat = os.stat(cfg.data)
    return {**dataclasses.asdict(cfg), "global_batch": cfg.batch_size * cfg.grad_accum * world,
            "data_sha256": data_hash(cfg.data, stat.st_size, stat.st_mtime_ns)}


@functools.cache
def data_hash(path: str, size: int, mtime_ns: int) -> str:
    return sha256(path)  # once per file version, not at every save


def save_and_export(cfg: TrainConfig, step, max_steps, model, optimizer, tokenizer, samples_seen, meta):
    """Checkpoints every --save_every steps and at the end, consolidated exports every --export_every."""
    out = Path(cfg.out_dir)
    if cfg.save_every and (step % cfg.save_every == 0 or step == max_steps):
        checkpoint.save(out / "checkpoints", step, model, optimizer,
                        {"samples_seen": samples_seen, "config": run_config(cfg, dist.world_size())}, cfg.keep_last)
    if cfg.export_every and step % cfg.export_every == 0 and step < max_steps:
        checkpoint.export(model, tokenizer, out / "exports" / f"step_{step:08d}", {"step": step, **meta})


def resume(cfg: TrainConfig, model, optimizer) -> tuple[int, int, bool]:
    """(step, global sample index, resumed?) from the newest complete checkpoint when --resume is set."""
    root = Path(cfg.out_dir) / "checkpoints"
    if not cfg.resume and any(root.glob("step_*")):
        raise ValueError(f"{root} holds checkpoints of an earlier run: pass --resume to continue it, or choose "
                         "another --out_dir")
    path = checkpoint.latest(root) if cfg.resume else None
    if path is None:
        if cfg.resume and not cfg.save_every:  # a requeued job would start from scratch every time
            raise ValueError(f"--resume with no checkpoint in {root} and no --save_every: nothing would ever be "
                             "resumed; pass --save_every")
        if cfg.resume:
            dist.print0(f"--resume: no complete checkpoint in {root}, starting from scratch")
        return 0, 0, False
    saved = json.loads((path / "state.json").read_text())["config"]
    if "min_lr" not in saved:  # its schedule decays to 0 and its optimizer has one parameter group
        raise ValueError(f"{path} was written before --min_lr and the weight-decay groups: this version cannot "
                         "resume it exactly; start a new run (or resume with the porover version that wrote it)")
    current = run_config(cfg, dist.world_size())
    if "data_sha256" not in saved:  # a checkpoint from before the hash was recorded: nothing to compare with
        dist.print0(f"{path}: no data hash recorded; resuming without checking that {cfg.data} is unchanged")
        saved["data_sha256"] = current["data_sha256"]
    checkpoint.check_config(saved, current)
    state = checkpoint.load(path, model, optimizer)
    dist.print0(f"resumed from {path} at step {state['step']}, global sample {state['samples_seen']}")
    return state["step"], state["samples_seen"], True


def format_row(row: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) of `max_steps`, with W = `warmup_steps`:

        step < W:   lr (step + 1) / W                                  (linear warmup, lr at step W - 1)
        step >= W:  min_lr + (lr - min_lr) (1 + cos(pi p)) / 2,   p = (step - W) / (max_steps - W)

    so step W (step 0 without warmup) uses lr, and the cosine reaches the floor min_lr at p = 1, the step
    after the last; the last step (max_steps - 1) uses min_lr + (lr - min_lr) sin^2(pi / (2 (max_steps - W))).
    A pure function of the step: resuming needs no scheduler state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(lengths: list[int], epoch: int, seed: int, batch_size: int, group_by_length: bool) -> list[int]:
    """The order of one epoch: a function of (seed, epoch) alone, so a resume recomputes it exactly."""
    if group_by_length:
        return length_grouped_order(lengths, batch_size, seed=seed * 100_003 + epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(len(lengths), generator=g).tolist()


def steps_per_epoch(n: int, global_batch: int) -> int:
    return math.ceil(n / global_batch)  # the last global batch of an epoch may be short; no example dropped


def rank_micro_batches(order: list[int], offset: int, batch_size: int, grad_accum: int, rank: int,
                       world: int) -> tuple[list[list[int]], int]:
    """This rank's `grad_accum` micro-batches (lists of example indices) for the global batch starting at
    `offset` in the epoch's order, and how many samples the global batch holds. Micro-step m of rank r
    takes the slice (m * world + r) * batch_size; in the short last batch some slices are empty, and the
    trainer still runs those micro-steps (with a fully masked stand-in) so that every rank makes the
    same collective calls."""
    idx = order[offset:offset + batch_size * grad_accum * world]
    mbs = [idx[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size] for m in range(grad_accum)]
    return mbs, len(idx)


def global_batch(items, lengths, samples_seen, cfg, rank, world, collate, stand_in):
    """This rank's collated micro-batches of the global batch that starts at global sample `samples_seen`,
    which of them hold real examples, how many samples the global batch holds, and the epoch."""
    epoch, offset = divmod(samples_seen, len(items))
    # Length groups span the global batch, which a resume on another world size keeps (batch_size may change).
    order = epoch_order(lengths, epoch, cfg.seed, cfg.batch_size * cfg.grad_accum * world, cfg.group_by_length)
    micro, consumed = rank_micro_batches(order, offset, cfg.batch_size, cfg.grad_accum, rank, world)
    batches = [collate([items[i] for i in mb] or [stand_in(items[0])]) for mb in micro]
    return batches, [bool(mb) for mb in micro], consumed, epoch


class MetricsFile:
    """out_dir/metrics.jsonl, one JSON object per line, written by rank 0 and flushed per row. On resume
    the rows after the checkpoint's step (from the interrupted run) are dropped."""

    def __init__(self, path: Path, resume_step: int | None, active: bool):
        self.path, self.active = path, active
        if active and resume_step is not None and path.exists():
            if cut_torn_line(path):  # a torn last line, left by a kill mid-write
                print(f"{path}: dropped a torn last line")
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("".join(r for r in lines if r.strip() and json.loads(r)["step"] <= resume_step))
        elif active and resume_step is None:
            path.write_text("")

    def write(self, row: dict, bar, log: bool):
        """Append the row, advance the progress bar, and print the row as the step's log line."""
        bar.update(1)
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if log:
                bar.write(format_row(row))


def finish(model, tokenizer, out: Path, step: int, meta: dict, bar):
    """The consolidated final export, also after a resume that finds the run already at max_steps (so a
    crash during the last export is repaired), then leave the process group."""
    bar.close()
    checkpoint.export(model, tokenizer, out / "final", {"step": step, **meta})
    dist.print0(f"saved {out / 'final'}")
    dist.teardown()
