"""Shared fixtures: the embedded SmolLM2 (converted once per session into POROVER_CACHE, which CI points
at a fresh folder) and tiny random Llama models that share its tokenizer."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
