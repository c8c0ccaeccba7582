"""Decontamination: a training prompt that matches an eval prompt is dropped and counted.

Three tests, strictest first, each reported under its own name:
  exact       the same text, surrounding whitespace aside;
  normalised  the same after `normalise` (Unicode NFKC, case folded, punctuation to spaces, whitespace collapsed);
  near        word n-gram overlap: with k = min(n, words in either text), the share of the shorter text's k-grams
              found in the other text is at least `threshold` (the overlap coefficient).
k shrinks for a short text so that a short eval prompt copied into a longer training prompt (or the reverse)
is still caught; below MIN_WORDS words only the first two tests apply (a 4-word phrase is common to many
unrelated prompts). Defaults n = 8, threshold = 0.5: one changed word kills every 8-gram that spans it, so a
paraphrase with a different topic word in the middle of a short prompt scores near 0, while an eval prompt
with a few words added or removed at either end keeps most of its 8-grams.
"""
import csv
import re
import unicodedata
from dataclasses import dataclass, field

from porover.data import DataError, prompt_messages, read_jsonl

NGRAM, THRESHOLD, MIN_WORDS = 8, 0.5, 5


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[\W_]", " ", text).split())


def prompt_text(messages: list[dict]) -> str:
    """The text a prompt is compared by: every non-system message (a system prompt is scaffolding, not content)."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def read_eval_prompts(path) -> list[tuple[str, str]]:
    """(name, text) for every prompt of an eval file: prompts JSONL (`prompt` or `messages`), or a CSV with a
    `prompt` column (XSTest, OR-Bench)."""
    if not str(path).endswith(".csv"):
        return [(f"{path}:{obj.get('id', lineno)}", prompt_text(prompt_messages(obj, path, lineno)))
                for lineno, obj in read_jsonl(path)]
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if "prompt" not in (reader.fieldnames or []):
                raise DataError(f"{path}:1: missing column 'prompt' (header: {reader.fieldnames})")
            return [(f"{path}:{row.get('id') or reader.line_num}", row["prompt"]) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from None


def ngrams(words: list[str], k: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}


def overlap(a: list[str], b: list[str], n: int = NGRAM) -> float:
    """Share of the shorter text's k-grams found in the other, k = min(n, len(a), len(b)); 0 below MIN_WORDS."""
    k = min(n, len(a), len(b))
    if k < MIN_WORDS:
        return 0.0
    ga, gb = ngrams(a, k), ngrams(b, k)
    return len(ga & gb) / min(len(ga), len(gb))


@dataclass
class Index:
    names: list[str] = field(default_factory=list)
    words: list[list[str]] = field(default_factory=list)
    exact: dict = field(default_factory=dict)  # stripped text -> eval index
    norm: dict = field(default_factory=dict)  # normalised text -> eval index
    grams: dict = field(default_factory=dict)  # MIN_WORDS-gram -> eval indices: any pair scoring > 0 shares one
    n: int = NGRAM


def build_index(evals: list[tuple[str, str]], n: int = NGRAM) -> Index:
    index = Index(n=n)
    for i, (name, text) in enumerate(evals):
        words = normalise(text).split()
        index.names.append(name)
        index.words.append(words)
        index.exact.setdefault(text.strip(), i)
        if words:
            index.norm.setdefault(" ".join(words), i)
        for g in ngrams(words, MIN_WORDS):
            index.grams.setdefault(g, set()).add(i)
    return index


def load_index(paths, n: int = NGRAM) -> Index:
    return build_index([p for path in paths for p in read_eval_prompts(path)], n)


def match(text: str, index: Index, threshold: float = THRESHOLD) -> dict | None:
    """{"kind": exact|normalised|near, "eval": the eval prompt's name, "score"} for the strictest test the text
    fails, or None when it is clean."""
    if (i := index.exact.get(text.strip())) is not None:
        return {"kind": "exact", "eval": index.names[i], "score": 1.0}
    words = normalise(text).split()
    if (i := index.norm.get(" ".join(words))) is not None:
        return {"kind": "normalised", "eval": index.names[i], "score": 1.0}
    near = sorted({i for g in ngrams(words, MIN_WORDS) for i in index.grams.get(g, ())})
    score, i = max(((overlap(words, index.words[i], index.n), i) for i in near), key=lambda x: x[0],
                   default=(0.0, None))
    return {"kind": "near", "eval": index.names[i], "score": round(score, 4)} if score >= threshold else None
