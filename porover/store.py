"""Files that survive a kill: atomic writes, and append-only JSONL stores that resume by key.

Every stage that pays for its results (a teacher call, a judge answer, a generated response) appends one
flushed line per finished item. A kill loses at most the line being written: a torn last line (no final
newline) is cut on the next open and counted. A file written in one go (SFT data, a summary, results)
goes through a temporary file and a rename, so a reader never sees half of it.
"""
import hashlib
import json
import os
from pathlib import Path

from porover.data import DataError, read_jsonl


def key_of(*parts) -> str:
    """sha256 of a JSON rendering of `parts`: the one way porover turns "what decides a result" into a key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def write_text(path, text: str):
    """Write through a temporary file and rename: a reader never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path, rows: list[dict]):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def cut_torn_line(path: Path) -> int:
    """Truncate a torn last line (left by a kill mid-write) of one of our append-only files: 1 if cut, else 0."""
    if not path.exists():
        return 0
    with open(path, "r+b") as f:
        size = end = f.seek(0, 2)
        while end and (f.seek(end - 1), f.read(1))[1] != b"\n":  # a torn line is one line: short to walk back
            end -= 1
        if end < size:
            f.truncate(end)
    return int(end < size)


class Store:
    """An append-only JSONL file of records that each carry `key_field`; the latest record of a key wins.

    Opening it cuts a torn last line (counted in `.torn`) and checks that every record has the key field, so
    a file some other program wrote is refused before anything in it is changed."""

    def __init__(self, path, key_field: str = "key"):
        self.path, self.key_field = Path(path), key_field
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_ours()
        self.torn = cut_torn_line(self.path)
        self.records = {}
        for _, rec in read_jsonl(self.path) if self.path.exists() else ():
            self.records[rec[key_field]] = rec
        self._file = None

    def _check_ours(self):
        """Every complete line is a record with the key field, else an error naming the first that is not."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.endswith(b"\n") or not raw.strip():
                    continue  # the torn last line, or a blank one
                try:
                    ok = self.key_field in json.loads(raw)
                except (ValueError, TypeError):
                    ok = False
                if not ok:
                    raise DataError(f"{self.path}:{lineno}: no field {self.key_field!r}: not a file this stage "
                                    "wrote; choose another output")

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def append(self, rec: dict):
        """Write one record and flush it: a killed run keeps every result it paid for."""
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[rec[self.key_field]] = rec

    def rewrite(self, rows: list[dict]):
        """Replace the file atomically with `rows` (e.g. only the records the current input still uses)."""
        self.close()
        write_jsonl(self.path, rows)
        self.records = {r[self.key_field]: r for r in rows}

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
