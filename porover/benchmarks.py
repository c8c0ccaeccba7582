"""Benchmark prompt loaders. Every record leaves here with `id`, `prompt` (or `messages`), `type`
(general / toxic / seemingly_toxic), `label` (safe / unsafe), `category` and `benchmark`; any other field
or CSV column is kept. Broken input is an error naming the file, the line and the field.

A spec names what to load: `demo` or `demo:dev` (the data/demo splits), a JSONL file, an XSTest CSV
(`id,prompt,type,label,...`), an OR-Bench CSV (`prompt,category`) or a safety-tuned-llamas JSON file
(`{"instructions": [...], "inputs": [...]}`: Q-Harm, I-CoNa, I-Controversial); `PATH@TYPE` sets the type of an
OR-Bench file whose name does not say it (Hard-1K: seemingly_toxic, Toxic: toxic).
"""
import csv
import json
from pathlib import Path

from porover.data import DataError, prompt_messages, read_jsonl

TYPES = ("general", "toxic", "seemingly_toxic")
DEMO_ROOT = Path(__file__).resolve().parent.parent / "data" / "demo"


def _typed(rec: dict, where: str) -> dict:
    """Derive the missing one of `type` and `label` from the other (toxic <-> unsafe); both missing, an
    unknown value, or a contradiction is an error."""
    t, label = rec.get("type"), rec.get("label")
    if t is None and label is None:
        raise DataError(f"{where}: missing field 'type' (or 'label': safe/unsafe)")
    if t is not None and t not in TYPES:
        raise DataError(f"{where}: field 'type' must be one of {TYPES}, got {t!r}")
    if label is not None and label not in ("safe", "unsafe"):
        raise DataError(f"{where}: field 'label' must be 'safe' or 'unsafe', got {label!r}")
    # A benign prompt labelled only "safe" in a benchmark file is one built to look harmful.
    t = t or ("toxic" if label == "unsafe" else "seemingly_toxic")
    if label is not None and (label == "unsafe") != (t == "toxic"):
        raise DataError(f"{where}: field 'label' {label!r} contradicts field 'type' {t!r}")
    return {**rec, "type": t, "label": "unsafe" if t == "toxic" else "safe"}


def load_jsonl(path, benchmark: str | None = None, prompt_type: str | None = None) -> list[dict]:
    """Generic prompts JSONL: {"id": str, "prompt" or "messages", ...}; `benchmark` defaults to the record's
    own field, else the file's stem; `prompt_type` fills a missing `type`."""
    out = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj.get("id"), str) or not obj["id"]:
            raise DataError(f"{where}: field 'id' must be a non-empty string")
        prompt_messages(obj, path, lineno)  # validates prompt / messages
        rec = {"type": prompt_type, **obj} if prompt_type and "type" not in obj else obj
        out.append({"category": None, "benchmark": benchmark or Path(path).stem, **_typed(rec, where)})
    return out


def _read_csv(path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) for each CSV row; a header without a required column, or a row without a value for
    one, is an error. utf-8-sig: spreadsheet exports start with a byte-order mark."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}:1: missing column {missing[0]!r} (header: {reader.fieldnames})")
            rows = []
            for row in reader:
                if short := [c for c in required if row[c] is None]:
                    raise DataError(f"{path}:{reader.line_num}: field {short[0]!r} is missing (a short row)")
                rows.append((reader.line_num, row))
            return rows
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None


def load_xstest(path) -> list[dict]:
    """XSTest (Röttger et al. 2024): unsafe prompts are exactly those whose `type` starts with `contrast_`,
    and `label` must agree; category = the type without that prefix, the original kept as `xstest_type`."""
    out = []
    for lineno, row in _read_csv(path, ("id", "prompt", "type", "label")):
        where = f"{path}:{lineno}"
        unsafe = row["type"].startswith("contrast_")
        if row["label"] not in ("safe", "unsafe") or (row["label"] == "unsafe") != unsafe:
            raise DataError(f"{where}: field 'label' {row['label']!r} disagrees with field 'type' {row['type']!r} "
                            "(unsafe exactly when the type starts with contrast_)")
        if not row["prompt"].strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "type", "label") and k is not None}
        out.append({**extra, "id": f"xstest-{row['id']}", "prompt": row["prompt"],
                    "type": "toxic" if unsafe else "seemingly_toxic", "label": "unsafe" if unsafe else "safe",
                    "category": row["type"].removeprefix("contrast_"), "benchmark": "xstest",
                    "xstest_type": row["type"]})
    return out


def load_orbench(path, prompt_type: str | None = None) -> list[dict]:
    """OR-Bench (Cui et al. 2024) `prompt,category`: Hard-1K (and 80K) are seemingly toxic, Toxic is toxic;
    the type comes from `prompt_type` or the file name. Ids are `<benchmark>-<row>`, benchmark = the stem."""
    name = Path(path).stem.lower().replace("_", "-")
    if prompt_type is None:
        if "hard" in name or "80k" in name:
            prompt_type = "seemingly_toxic"
        elif "toxic" in name:
            prompt_type = "toxic"
        else:
            raise DataError(f"{path}: cannot tell OR-Bench Hard from Toxic by the name: give {path}@toxic or "
                            f"{path}@seemingly_toxic")
    out = []
    for i, (lineno, row) in enumerate(_read_csv(path, ("prompt", "category")), 1):
        if not row["prompt"].strip():
            raise DataError(f"{path}:{lineno}: field 'prompt' is empty")
        rec = {k: v for k, v in row.items() if k is not None}
        out.append(_typed({**rec, "id": f"{name}-{i:05d}", "type": prompt_type, "benchmark": name},
                          f"{path}:{lineno}"))
    return out


def load_instructions(path) -> list[dict]:
    """A safety-tuned-llamas evaluation file (Bianchi et al. 2024): {"instructions": [str], "inputs": [str]}, every
    prompt a harmful request (type toxic). A non-empty input follows its instruction after a blank line; `inputs`
    may be absent or empty (the published Q-Harm and I-CoNa files ship `[]`). Ids are `<stem>-00001`...,
    benchmark and category the file's stem."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object with field 'instructions', got {type(obj).__name__}")
    instructions, inputs = obj.get("instructions"), obj.get("inputs") or []
    if not isinstance(instructions, list) or not all(isinstance(s, str) for s in instructions):
        raise DataError(f"{path}: field 'instructions' must be a list of strings")
    if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
        raise DataError(f"{path}: field 'inputs' must be a list of strings")
    if inputs and len(inputs) != len(instructions):
        raise DataError(f"{path}: field 'inputs' has {len(inputs)} entries for {len(instructions)} instructions")
    stem, out = Path(path).stem, []
    for i, (text, extra) in enumerate(zip(instructions, inputs or [""] * len(instructions)), 1):
        if not text.strip():
            raise DataError(f"{path}: field 'instructions'[{i - 1}] is empty")
        out.append({"id": f"{stem}-{i:05d}", "prompt": f"{text}\n\n{extra}" if extra.strip() else text,
                    "type": "toxic", "label": "unsafe", "category": stem, "benchmark": stem})
    return out


def load_demo(split: str = "eval", root=DEMO_ROOT) -> list[dict]:
    """The data/demo prompt splits of one split (train/dev/eval), all three types, as benchmark "demo"."""
    return [rec for t in ("toxic", "seemingly_toxic", "general")
            for rec in load_jsonl(Path(root) / f"{t}_{split}.jsonl", benchmark="demo")]


def load(spec: str) -> list[dict]:
    """One spec (see the module docstring)."""
    if spec == "demo" or spec.startswith("demo:"):
        return load_demo(spec.partition(":")[2] or "eval")
    path, _, prompt_type = spec.partition("@")
    if prompt_type and prompt_type not in TYPES:
        raise DataError(f"{spec}: type after @ must be one of {TYPES}")
    if path.endswith(".csv"):
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            header = next(csv.reader(f), [])
        if {"id", "type", "label"} <= set(header):
            if prompt_type:
                raise DataError(f"{spec}: an XSTest file carries its own types; drop @{prompt_type}")
            return load_xstest(path)
        return load_orbench(path, prompt_type or None)
    if path.endswith(".json"):
        if prompt_type:
            raise DataError(f"{spec}: a safety-tuned-llamas file holds harmful requests only; drop @{prompt_type}")
        return load_instructions(path)
    return load_jsonl(path, prompt_type=prompt_type or None)


def load_all(specs: str) -> list[dict]:
    """Comma-separated specs, concatenated; an id must be unique across all of them."""
    records, seen = [], {}
    for spec in filter(None, (s.strip() for s in specs.split(","))):
        for rec in load(spec):
            if rec["id"] in seen:
                raise DataError(f"{spec}: field 'id': {rec['id']!r} already loaded from {seen[rec['id']]}")
            seen[rec["id"]] = spec
            records.append(rec)
    if not records:
        raise DataError(f"no prompts in {specs!r}")
    return records
