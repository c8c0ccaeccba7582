"""Chat template, tokenization, loss masks, truncation and batching (README "Tokenization and masks").

The training sequence is exactly what the model sees at inference: the prompt rendered by the chat
template with the generation prompt, then the response text tokenized on its own, then the template's
end-of-turn token. Tokenizing the rendered conversation in one go can merge tokens across the boundary
(SmolLM2: a response starting with "\\n\\n" merges with the template's "\\n"), so we never do that.
The loss mask covers the response tokens and the end-of-turn token; the template's scaffolding after it
(SmolLM2: the "\\n" after <|im_end|>) is never part of the sequence.
"""
import random
from collections import Counter
from pathlib import Path

import torch

# For base models without a template: ChatML markers as plain text, each turn closed by the tokenizer's
# EOS, so the single token the model learns to stop on is the one generation stops on.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SENTINEL = "PoRoVeRsEnTiNeL"


def prepare_tokenizer(tokenizer, chat_template: str | None = None) -> int:
    """Set the chat template and pad token; return the end-of-turn token id the loss trains.

    `chat_template`: None keeps the tokenizer's own, "chatml" the default above, else a template file.
    Padding is excluded by the attention and loss masks, never by comparing ids, so pad = EOS (as in
    SmolLM2) cannot untrain the end of turn; a tokenizer without a pad token gets unk or bos (GPT-2 style
    tokenizers: both are EOS, which is fine for that reason; an ordinary token as pad would vanish from decoded
    text with skip_special_tokens).
    """
    if chat_template == "chatml":
        tokenizer.chat_template = CHATML
    elif chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text()
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template (a base model?): pass --chat_template chatml or a file")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.bos_token or tokenizer.convert_ids_to_tokens(0)
    # Find the end-of-turn token: render a conversation whose answer is a sentinel and read what follows it.
    msgs = [{"role": "user", "content": "hi"}]
    prompt = render(tokenizer, msgs)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
    if not full.startswith(prompt + _SENTINEL):
        raise ValueError("the chat template does not place the answer right after the generation prompt")
    suffix = tokenizer(full[len(prompt + _SENTINEL):], add_special_tokens=False).input_ids
    if not suffix:
        return tokenizer.eos_token_id
    if suffix[0] not in tokenizer.all_special_ids and suffix[0] not in tokenizer.added_tokens_decoder:
        raise ValueError(f"the chat template ends a turn with {tokenizer.decode(suffix[:3])!r}, not a special token")
    return suffix[0]


def render(tokenizer, messages: list[dict]) -> str:
    """The one place a chat template is applied: the prompt text up to where the answer starts."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer(render(tokenizer, messages), add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    # A template that does not write the BOS its tokenizer would add gets exactly one; never two.
    if bos is not None and tokenizer("a").input_ids[:1] == [bos] and ids[:1] != [bos]:
        ids = [bos] + ids
    assert ids[:2] != [bos, bos] or bos is None, "the prompt starts with two BOS tokens"
    return ids


def encode_response(tokenizer, response: str, eot_id: int) -> list[int]:
    return tokenizer(response, add_special_tokens=False).input_ids + [eot_id]


def build_example(prompt_ids, response_ids, max_length, max_prompt_length=None, counts: Counter | None = None):
    """input_ids and loss_mask for prompt + response, or None (skipped, counted).

    Truncation keeps the end of the prompt (only with `max_prompt_length`), then the start of the
    response; a response cut here loses its end-of-turn token, which is counted.
    """
    counts = Counter() if counts is None else counts
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        counts["prompt_truncated"] += 1
    room = max_length - len(prompt_ids)
    if room < 2:  # no room for a single response token plus the end of turn
        counts["prompt_too_long"] += 1
        return None
    if len(response_ids) > room:
        response_ids = response_ids[:room]
        counts["response_truncated_lost_eot"] += 1
    return {
        "input_ids": prompt_ids + response_ids,
        "loss_mask": [0] * len(prompt_ids) + [1] * len(response_ids),
    }


def tokenize_sft(tokenizer, eot_id, examples, max_length, max_prompt_length=None) -> tuple[list[dict], Counter]:
    counts, out = Counter(), []
    for ex in examples:
        response = encode_response(tokenizer, ex["response"], eot_id)
        if ex.get("meta", {}).get("truncated"):  # a teacher answer cut by max tokens: never train a stop after it
            response = response[:-1]
            counts["kept_truncated_without_eot"] += 1
        item = build_example(encode_prompt(tokenizer, ex["prompt"]), response, max_length, max_prompt_length, counts)
        if item is not None:
            out.append(item)
    return out, counts


def tokenize_pairs(tokenizer, eot_id, examples, max_length, max_prompt_length=None) -> tuple[list[dict], Counter]:
    """Preference pairs as {"chosen": item, "rejected": item}, both sides sharing the prompt ids; a pair is
    skipped (counted) when either side is. A side marked "chosen_truncated" or "rejected_truncated" (cut by the
    length limit where it was generated) gets no end-of-turn token: the pair teaches nothing about stopping there."""
    counts, out = Counter(), []
    for ex in examples:
        prompt, pair = encode_prompt(tokenizer, ex["prompt"]), {}
        for side in ("chosen", "rejected"):
            side_counts, response = Counter(), encode_response(tokenizer, ex[side], eot_id)
            if ex.get("meta", {}).get(f"{side}_truncated"):
                response = response[:-1]
                counts[f"{side}_kept_truncated_without_eot"] += 1
            pair[side] = build_example(prompt, response, max_length, max_prompt_length, side_counts)
            for k, v in side_counts.items():  # prompt events happen to both sides alike: count them once
                if not (k.startswith("prompt") and side == "rejected"):
                    counts[k if k.startswith("prompt") else f"{side}_{k}"] += v
            if pair[side] is None:  # no room for a response after the prompt
                break
        else:
            if pair["chosen"]["input_ids"] == pair["rejected"]["input_ids"]:
                counts["identical_after_truncation"] += 1  # the two answers differ only after the cut: no signal
            else:
                out.append(pair)
    return out, counts


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids, attention_mask, loss_mask, each (B, T)."""
    T = max(len(it["input_ids"]) for it in items)
    batch = {"input_ids": [], "attention_mask": [], "loss_mask": []}
    for it in items:
        n = len(it["input_ids"])
        batch["input_ids"].append(it["input_ids"] + [pad_id] * (T - n))
        batch["attention_mask"].append([1] * n + [0] * (T - n))
        batch["loss_mask"].append(it["loss_mask"] + [0] * (T - n))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen then rejected in one (2B, T) batch, so the policy runs one forward for both."""
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, group: int = 64) -> list[int]:
    """A shuffled order whose consecutive `batch_size` runs have similar lengths (less padding).

    Shuffle, cut into groups of `group` batches, sort each group by length, then shuffle the batches so
    that long batches do not all come together.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    order = [i for s in range(0, len(order), span) for i in sorted(order[s:s + span], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]
