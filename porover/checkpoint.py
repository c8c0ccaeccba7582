"""Sharded, atomic checkpoints with exact resume, and the consolidated transformers export (README
"Distributed training").

A checkpoint is `out_dir/checkpoints/step_NNNNNNNN/`: model and optimizer through
torch.distributed.checkpoint (each rank writes its shards: the same code serves DDP and FSDP2), each
rank's RNG state, and state.json (step, global sample index, config). It is written under a temporary
name and renamed by rank 0 after a barrier, so a folder named step_* is always complete.
"""
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from porover import dist
from porover.store import write_json

# Settings that may change on --resume; any other change is refused (the run would silently differ).
# batch_size and grad_accum may change with the world size as long as the global batch stays the same.
RESUME_ALLOWED = {"resume", "max_steps", "save_every", "eval_every", "export_every", "keep_last", "log_every",
                  "batch_size", "grad_accum"}


def _rng_state():
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def save(root: Path, step: int, model, optimizer, state: dict, keep_last: int | None):
    """Checkpoint `step` under root: written in full under a temporary name, then renamed (every rank calls
    this: each writes its own shards)."""
    write(root, step, model, optimizer, state)
    publish(root, step, keep_last)


def _paths(root: Path, step: int) -> tuple[Path, Path]:
    return root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"


def write(root: Path, step: int, model, optimizer, state: dict):
    """Model, optimizer, each rank's RNG and state.json into root/.tmp-step_N (a collective)."""
    tmp = _paths(root, step)[1]
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=not tdist.is_initialized())
    torch.save(_rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    if dist.rank() == 0:
        write_json(tmp / "state.json", {"step": step, "world_size": dist.world_size(), **state})
    dist.barrier()


def publish(root: Path, step: int, keep_last: int | None):
    """Rename the complete root/.tmp-step_N to root/step_N, then keep only the newest `keep_last` (rank 0
    renames; every rank waits for it)."""
    final, tmp = _paths(root, step)
    if dist.rank() == 0:
        os.rename(tmp, final)
        if keep_last:
            for old in sorted(root.glob("step_*"))[:-keep_last]:
                shutil.rmtree(old)
    dist.barrier()


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint; half-written `.tmp-*` folders are never candidates."""
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def check_config(saved: dict, current: dict):
    """Refuse a resume whose config differs outside RESUME_ALLOWED (the configs carry "global_batch")."""
    changed = sorted(k for k in saved.keys() | current.keys()
                     if k not in RESUME_ALLOWED and saved.get(k) != current.get(k))
    if changed:
        raise ValueError("--resume with a changed config: " + ", ".join(
            f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            + f" (only {', '.join(sorted(RESUME_ALLOWED))} may change)")


def load(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return state.json."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path, no_dist=not tdist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng_file = path / f"rng_rank{dist.rank()}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved: data order stays exact anyway
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "state.json").read_text())


def export(model, tokenizer, dest: Path, extra: dict | None = None):
    """A standard transformers checkpoint (consolidated safetensors, tied weights intact, tokenizer),
    written to a temporary folder and renamed into place."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state_dict = get_model_state_dict(model, options=options)  # a collective: every rank calls it
    if dist.rank() == 0:
        inner = getattr(model, "module", model)
        tmp, old = dest.with_name(f".tmp-{dest.name}"), dest.with_name(f".old-{dest.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        inner.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra:
            write_json(tmp / "porover.json", extra)
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
