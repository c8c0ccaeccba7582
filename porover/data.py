"""JSONL input: strict errors for broken files, counted skips for unusable examples.

An error names the file, the line and the field: the user fixes the file and nothing is lost. A skip is
an example that is well-formed but cannot be trained on (an empty response, a prompt with no room left):
it is counted under a reason and the counts are reported, never dropped silently.
"""
import json
from collections import Counter
from pathlib import Path


class DataError(ValueError):
    pass


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; any unreadable line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


def _field(obj, key, path, lineno, kind=str):
    if key not in obj:
        raise DataError(f"{path}:{lineno}: missing field {key!r}")
    if not isinstance(obj[key], kind):
        raise DataError(f"{path}:{lineno}: field {key!r} must be {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _messages(obj, key, path, lineno) -> list[dict]:
    msgs = _field(obj, key, path, lineno, list)
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{path}:{lineno}: field {key!r}[{i}] must be an object with string 'role' and 'content'")
    return msgs


def prompt_messages(obj, path, lineno) -> list[dict]:
    """A prompt record's conversation: `prompt` (a string or a message list) or `messages`."""
    if "messages" in obj and "prompt" not in obj:
        return _messages(obj, "messages", path, lineno)
    if isinstance(obj.get("prompt"), list):
        return _messages(obj, "prompt", path, lineno)
    return [{"role": "user", "content": _field(obj, "prompt", path, lineno)}]


def read_sft(path) -> tuple[list[dict], Counter]:
    """SFT examples as {"prompt": messages, "response": str, "meta": record}, and skip counts.

    Accepts {"prompt", "response"} or {"messages": [...]} whose last message is the assistant's answer;
    only that last turn is trained on.
    """
    examples, skipped = [], Counter()
    for lineno, obj in read_jsonl(path):
        if "messages" not in obj:  # {"prompt", "response"}: name the field that is missing, not the other form
            prompt, response = prompt_messages(obj, path, lineno), _field(obj, "response", path, lineno)
        else:
            msgs = _messages(obj, "messages", path, lineno)
            if not msgs or msgs[-1]["role"] != "assistant":
                raise DataError(f"{path}:{lineno}: field 'messages' must end with an assistant message")
            prompt, response = msgs[:-1], msgs[-1]["content"]
        if not prompt:
            raise DataError(f"{path}:{lineno}: field 'messages' has no prompt before the assistant's answer")
        if not response.strip():
            skipped["empty_response"] += 1
            continue
        examples.append({"prompt": prompt, "response": response, "meta": obj})
    return examples, skipped


def _side(obj, key, path, lineno) -> tuple[str, list[dict] | None]:
    """A preference side: a string, or a message list ending with the assistant's answer (whose earlier
    messages are the prompt when the record has no `prompt`)."""
    if isinstance(obj.get(key), list):
        msgs = _messages(obj, key, path, lineno)
        if not msgs or msgs[-1]["role"] != "assistant":
            raise DataError(f"{path}:{lineno}: field {key!r} must end with an assistant message")
        return msgs[-1]["content"], msgs[:-1]
    return _field(obj, key, path, lineno), None


def read_pref(path) -> tuple[list[dict], Counter]:
    """Preference pairs as {"prompt": messages, "chosen": str, "rejected": str, "meta": record}, and skip
    counts (an empty side, or chosen identical to rejected, teaches nothing)."""
    examples, skipped = [], Counter()
    for lineno, obj in read_jsonl(path):
        chosen, context = _side(obj, "chosen", path, lineno)
        rejected, rejected_context = _side(obj, "rejected", path, lineno)
        if context is not None and rejected_context is not None and context != rejected_context:
            raise DataError(f"{path}:{lineno}: fields 'chosen' and 'rejected' carry different conversations")
        prompt = prompt_messages(obj, path, lineno) if "prompt" in obj or context is None else context
        if not prompt:
            raise DataError(f"{path}:{lineno}: field 'chosen' has no prompt before the assistant's answer")
        if not chosen.strip() or not rejected.strip():
            skipped["empty_chosen" if not chosen.strip() else "empty_rejected"] += 1
        elif chosen.strip() == rejected.strip():
            skipped["chosen_equals_rejected"] += 1
        else:
            examples.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": obj})
    return examples, skipped


def format_counts(counts: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
