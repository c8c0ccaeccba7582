"""What both trainers share: the learning-rate schedule, the data order and how each global batch is
split over micro-steps and ranks, and the metrics file."""
import json
import math
from pathlib import Path

import torch

from porover.chat import length_grouped_order


def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to 0 at `max_steps`.
    A pure function of the step: resuming needs no scheduler state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
    order = epoch_order(lengths, epoch, cfg.seed, cfg.batch_size, cfg.group_by_length)
    micro, consumed = rank_micro_batches(order, offset, cfg.batch_size, cfg.grad_accum, rank, world)
    batches = [collate([items[i] for i in mb] or [stand_in(items[0])]) for mb in micro]
    return batches, [bool(mb) for mb in micro], consumed, epoch


class MetricsFile:
    """out_dir/metrics.jsonl, one JSON object per line, written by rank 0 and flushed per row. On resume
    the rows after the checkpoint's step (from the interrupted run) are dropped."""

    def __init__(self, path: Path, resume_step: int | None, active: bool):
        self.path, self.active = path, active
        if active and resume_step is not None and path.exists():
            rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= resume_step]
            path.write_text("".join(r + "\n" for r in rows))
        elif active and resume_step is None:
            path.write_text("")

    def write(self, row: dict):
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
