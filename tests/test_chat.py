"""Tokenization policy (README "Tokenization and masks") on the real SmolLM2 tokenizer."""
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from porover import chat

PROMPT = [{"role": "user", "content": "Name a primary colour."}]


def masked_strings(tok, item):
    return [tok.decode([i]) for i, m in zip(item["input_ids"], item["loss_mask"]) if m]


def test_golden_mask(smol_tok):
    """Hand-written: the response tokens and <|im_end|>; not the template's "\n" after it, nothing of the
    prompt (whose last tokens are "<|im_start|>assistant\n")."""
    tok, eot = smol_tok
    item = chat.build_example(chat.encode_prompt(tok, PROMPT),
                              chat.encode_response(tok, "Red is one.\n\nBlue is another!", eot), 256)
    assert masked_strings(tok, item) == ["Red", " is", " one", ".", "\n", "\n", "Blue", " is", " another", "!",
                                         "<|im_end|>"]
    unmasked = [tok.decode([i]) for i, m in zip(item["input_ids"], item["loss_mask"]) if not m]
    assert unmasked[-6:] == ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"]
    assert item["input_ids"][-1] == eot and tok.convert_ids_to_tokens(eot) == "<|im_end|>"


@pytest.mark.parametrize("response", ["\n\nA leading blank line.", "   three leading spaces", "日本語の答えです。",
                                      "Привет, мир"])
def test_boundary_keeps_prompt_and_round_trips(smol_tok, response):
    """A joint tokenization would merge a leading "\n\n" into the template's "\n"; ours keeps the prompt ids
    exactly as at inference and the response decodes back to itself."""
    tok, eot = smol_tok
    prompt_ids = chat.encode_prompt(tok, PROMPT)
    item = chat.build_example(prompt_ids, chat.encode_response(tok, response, eot), 512)
    assert item["input_ids"][:len(prompt_ids)] == prompt_ids
    assert prompt_ids == tok(chat.render(tok, PROMPT), add_special_tokens=False).input_ids
    resp = [i for i, m in zip(item["input_ids"], item["loss_mask"]) if m]
    assert resp[-1] == eot and tok.decode(resp[:-1]) == response


def test_joint_tokenization_would_differ(smol_tok):
    """Why the boundary rule exists: tokenizing the whole rendered conversation merges "\n" + "\n\n"."""
    tok, eot = smol_tok
    full = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": "\n\nHi"}], tokenize=False)
    joint = tok(full, add_special_tokens=False).input_ids
    ours = chat.encode_prompt(tok, PROMPT) + chat.encode_response(tok, "\n\nHi", eot)
    assert joint[:len(ours)] != ours


def test_bos_once_per_turn(smol_tok):
    tok, _ = smol_tok
    ids = chat.encode_prompt(tok, PROMPT)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    # SmolLM2's BOS <|im_start|> opens each of the three turns: system, user, assistant.
    assert ids.count(tok.bos_token_id) == 3


def test_pad_equal_to_eos_keeps_trained_eos(smol_tok):
    tok, eot = smol_tok
    assert tok.pad_token_id == eot  # SmolLM2: pad = eos = <|im_end|>
    items = [chat.build_example(chat.encode_prompt(tok, PROMPT), chat.encode_response(tok, r, eot), 256)
             for r in ["Red.", "Red, blue and yellow are the primary colours of paint."]]
    batch = chat.collate(items, tok.pad_token_id)
    short = len(items[0]["input_ids"])
    assert batch["input_ids"][0, short - 1] == eot and batch["loss_mask"][0, short - 1] == 1
    assert batch["input_ids"][0, short:].eq(eot).all()  # the padding uses the same id ...
    assert batch["loss_mask"][0, short:].eq(0).all() and batch["attention_mask"][0, short:].eq(0).all()  # ... masked


def test_base_model_gets_chatml_and_a_pad_that_is_not_eos(smol_tok, tmp_path):
    tok, _ = smol_tok
    tok.save_pretrained(tmp_path)
    base = AutoTokenizer.from_pretrained(tmp_path)
    base.chat_template = None
    base.pad_token = None
    with pytest.raises(ValueError, match="--chat_template chatml"):
        chat.prepare_tokenizer(base)
    eot = chat.prepare_tokenizer(base, "chatml")
    assert eot == base.eos_token_id and base.pad_token_id != eot
    ids = chat.encode_response(base, "Hi", eot)
    assert ids[-1] == eot


def test_truncation_counts(smol_tok):
    tok, eot = smol_tok
    prompt, response = chat.encode_prompt(tok, PROMPT), chat.encode_response(tok, "word " * 50, eot)
    counts = Counter()
    item = chat.build_example(prompt, response, len(prompt) + 10, counts=counts)
    assert len(item["input_ids"]) == len(prompt) + 10 and item["input_ids"][-1] != eot
    assert counts == {"response_truncated_lost_eot": 1}
    item = chat.build_example(prompt, response, 40, max_prompt_length=20, counts=counts)
    assert item["input_ids"][:20] == prompt[-20:] and sum(item["loss_mask"]) == 20
    assert counts["prompt_truncated"] == 1
    assert chat.build_example(prompt, response, len(prompt) + 1, counts=counts) is None
    assert counts["prompt_too_long"] == 1


def test_a_pair_identical_after_truncation_is_skipped_and_counted(smol_tok):
    tok, eot = smol_tok
    same_start = "word " * 40
    examples = [{"prompt": PROMPT, "chosen": same_start + "and the good end.", "rejected": same_start + "a bad end."},
                {"prompt": PROMPT, "chosen": "Red.", "rejected": "Blue."}]
    items, counts = chat.tokenize_pairs(tok, eot, examples, max_length=len(chat.encode_prompt(tok, PROMPT)) + 20)
    assert len(items) == 1 and counts["identical_after_truncation"] == 1


def test_tokenize_sft_counts_skips(smol_tok):
    tok, eot = smol_tok
    examples = [{"prompt": PROMPT, "response": "Red."}, {"prompt": [{"role": "user", "content": "x " * 400}],
                                                          "response": "ok"}]
    items, counts = chat.tokenize_sft(tok, eot, examples, max_length=128)
    assert len(items) == 1 and counts == {"prompt_too_long": 1}


def test_collate_shapes_and_padding():
    items = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [5], "loss_mask": [0]}]
    b = chat.collate(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert all(v.dtype == torch.long for v in b.values())


def test_length_grouped_order_is_a_permutation_with_less_padding():
    lengths = [(i * 37) % 200 + 1 for i in range(512)]
    order = chat.length_grouped_order(lengths, batch_size=8, seed=0)
    assert sorted(order) == list(range(512))
    assert order == chat.length_grouped_order(lengths, batch_size=8, seed=0)
    assert order != chat.length_grouped_order(lengths, batch_size=8, seed=1)

    def padded(o):
        return sum(8 * max(lengths[i] for i in o[s:s + 8]) for s in range(0, len(o), 8))
    import random
    shuffled = list(range(512))
    random.Random(0).shuffle(shuffled)
    assert padded(order) < 0.6 * padded(shuffled)


def test_a_kept_truncated_answer_trains_no_end_of_turn(smol_tok):
    """overgen.py select --keep_truncated marks answers cut by max tokens; SFT must not teach a stop there."""
    tok, eot = smol_tok
    examples = [{"prompt": PROMPT, "response": "Red, blue and", "meta": {"truncated": True}},
                {"prompt": PROMPT, "response": "Red.", "meta": {}}]
    items, counts = chat.tokenize_sft(tok, eot, examples, max_length=128)
    assert items[0]["input_ids"][-1] != eot and items[1]["input_ids"][-1] == eot
    assert counts == {"kept_truncated_without_eot": 1}
