"""Shared fixtures: the embedded SmolLM2 (converted once per session into POROVER_CACHE, which CI points
at a fresh folder) and tiny random Llama models that share its tokenizer."""
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from porover import chat, models


@pytest.fixture(scope="session")
def smol_path():
    return models.resolve_model(models.EMBEDDED)


@pytest.fixture(scope="session")
def smol_tok(smol_path):
    tok = models.load_tokenizer(smol_path)
    eot = chat.prepare_tokenizer(tok)
    return tok, eot


def tiny_llama(vocab_size=49152, dropout=0.0, seed=0, layers=2):
    """A random Llama small enough for CPU tests, with SmolLM2's vocabulary and special ids."""
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, attention_dropout=dropout, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def tiny_reward_model(smol_path, dest, num_labels=1):
    """A random Llama sequence classifier with SmolLM2's tokenizer and chat template, saved to `dest`: a reward model
    whose scores are noise but are computed exactly as a real one's. Returns (model, tokenizer)."""
    tok = AutoTokenizer.from_pretrained(smol_path)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=num_labels, pad_token_id=tok.pad_token_id)).eval()
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return model, tok
