"""Faults injected into porover.checkpoint from the tests, never from product code.

In a test process: `monkeypatch.setattr(checkpoint, *faults.patch("after_save", 3))`. Under torchrun (or
python), a training script run through this file, which patches before the script's main runs:

    python -m torch.distributed.run ... tests/faults.py KIND:AT train_sft.py --flags ...

Kinds: "after_save:STEP" stops the process right after checkpoint STEP is saved; "before_rename:STEP" stops
it with checkpoint STEP written under its temporary name but not renamed; "rank_raises:RANK" makes that
rank raise at its first save, after printing the time (`FAULT_AT <unix seconds>`) on stderr.
"""
import runpy
import sys
import time

from porover import checkpoint, dist


def patch(kind: str, at: int) -> tuple[str, object]:
    """(name of the porover.checkpoint function to replace, its faulty stand-in)."""
    save, publish = checkpoint.save, checkpoint.publish
    if kind == "after_save":
        def after_save(root, step, *args, **kwargs):
            save(root, step, *args, **kwargs)
            if step == at:
                raise SystemExit(f"after_save: stopped after saving step {step}")
        return "save", after_save
    if kind == "before_rename":
        def before_rename(root, step, keep_last):
            if step == at:
                raise SystemExit(f"before_rename: stopped with step {step} written but not renamed")
            publish(root, step, keep_last)
        return "publish", before_rename
    if kind == "rank_raises":
        def rank_raises(*args, **kwargs):
            if dist.rank() == at:
                print(f"FAULT_AT {time.time()}", file=sys.stderr, flush=True)
                raise RuntimeError(f"rank {at} failed on purpose")
            save(*args, **kwargs)
        return "save", rank_raises
    raise ValueError(f"unknown fault {kind!r}")


if __name__ == "__main__":
    fault, script, *argv = sys.argv[1:]
    kind, _, at = fault.partition(":")
    setattr(checkpoint, *patch(kind, int(at)))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
