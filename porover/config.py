"""Config dataclasses as command lines, and the provenance every artifact records.

Flags come from the dataclass fields: an unknown flag is an error that lists the valid ones; no config
file is ever executed or evaluated.
"""
import argparse
import dataclasses
import hashlib
import os
import platform
import subprocess
import sys
import types
import typing
from importlib import metadata
from pathlib import Path


def parse(cls, argv=None, description=None):
    """Build argparse from `cls`'s fields (`--name value`; bools as `--name`/`--no-name`; a `tuple[str, ...]` takes
    several values and may be repeated: `--eval_files a.jsonl b.csv --eval_files c.csv`)."""
    p = argparse.ArgumentParser(description=description or cls.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, choices = hints[f.name], None
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None` -> int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is typing.Literal:
            choices, kind = typing.get_args(kind), str
        if kind is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        elif typing.get_origin(kind) is tuple:
            p.add_argument(f"--{f.name}", nargs="+", action="extend", default=[])
        else:
            p.add_argument(f"--{f.name}", type=kind, choices=choices, default=f.default)
    args = vars(p.parse_args(argv))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance(inputs: dict[str, str | None], **extra) -> dict:
    """Git commit, package versions, host facts and input-file hashes for config/summary/results files."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    versions = {}
    for pkg in ("torch", "transformers", "tokenizers", "numpy", "openai"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"git_commit": commit, "git_dirty": dirty, "python": sys.version.split()[0], "packages": versions,
            "host": platform.node(), "input_sha256": {k: sha256(v) for k, v in inputs.items() if v and os.path.isfile(v)},
            **extra}
