"""Local batched generation with a transformers model: the one place porover samples from a local model.

overgen.py (teacher candidates, the student's answers), evaluate.py (the model under test) and the benches
call `load` and `answer_batch`; cache keys name a local model by `identity`.
"""
from pathlib import Path

import torch

from porover import chat, dist, models
from porover.store import key_of


def identity(name: str, chat_template: str | None = None) -> str:
    """A model's identity in cache keys. A local folder (the embedded model's converted one included) is named by
    its files' names, sizes and mtimes, so a checkpoint retrained in place is a new model; a hub id or a served
    name by itself. Another chat template is other tokens in front of the model, so it is part of the identity."""
    path = Path(models.resolve_model(name)) if name == models.EMBEDDED else Path(name)
    ident = name
    if path.is_dir():
        files = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in sorted(path.rglob("*")) if p.is_file()]
        ident = f"{name}#{key_of(files)[:16]}"
    if chat_template:
        ident += "|template:" + (chat_template if chat_template == "chatml" else
                                 key_of(Path(chat_template).read_text(encoding="utf-8"))[:16])
    return ident


def device_and_dtype(dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when there is a GPU, else CPU with fp32 (bf16 matmuls on CPU are slow and inexact)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    return device, torch.bfloat16 if dtype == "bf16" else torch.float32


def load(name: str, chat_template: str | None = None, dtype: str | None = None, device=None):
    """(model in eval mode, tokenizer, stop ids). Generation stops at the template's end-of-turn token or the
    tokenizer's EOS, whichever comes first (one rule for every caller)."""
    default_device, torch_dtype = device_and_dtype(dtype)
    tokenizer = models.load_tokenizer(name)
    eot = chat.prepare_tokenizer(tokenizer, chat_template)
    model = models.load_model(name, dtype=torch_dtype).to(device or default_device).eval()
    return model, tokenizer, sorted({eot, tokenizer.eos_token_id} - {None})


def batch_seed(keys: list[str]) -> int:
    """A sampled batch's seed, from its items' keys: the same batch gives the same samples on any rank or rerun."""
    return int(key_of(keys)[:15], 16)


@torch.no_grad()
def answer_batch(model, tokenizer, stop_ids: list[int], prompt_ids: list[list[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """One left-padded batch through model.generate (greedy at temperature 0): per prompt the response text,
    its finish reason ("stop" at a stop token, "length" when cut at max_new_tokens) and its token count."""
    pad, T, device = tokenizer.pad_token_id, max(map(len, prompt_ids)), next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompt_ids], device=device)  # (B, T)
    attention = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompt_ids], device=device)  # (B, T)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         eos_token_id=stop_ids, pad_token_id=pad, **sampling)[:, T:]  # (B, new)
    results = []
    for row in out.tolist():
        end = next((j for j, t in enumerate(row) if t in stop_ids), None)
        row = row if end is None else row[:end]
        results.append({"text": tokenizer.decode(row, skip_special_tokens=True),
                        "finish_reason": "length" if end is None else "stop", "n_tokens": len(row)})
    return results


def answer_all(cfg, messages: list[list[dict]], keys: list[str], todo: list[int], sink):
    """Answers to the to-do prompts, data-parallel: batch b of the to-do list is batch b on any world size. Rank r runs
    batches r, r + W, ...; after each round rank 0 gathers the round's answers and hands them to sink(i, answer) in
    batch order (so the output is the file a single process writes). cfg: model, chat_template, dtype, batch_size,
    max_new_tokens, temperature, top_p."""
    rank, world, device = dist.setup()
    model, tokenizer, stop_ids = load(cfg.model, cfg.chat_template, cfg.dtype, device)
    batches = [todo[s:s + cfg.batch_size] for s in range(0, len(todo), cfg.batch_size)]
    for r0 in range(0, len(batches), world):
        mine = batches[r0 + rank] if r0 + rank < len(batches) else []
        ids = [chat.encode_prompt(tokenizer, messages[i]) for i in mine]
        res = answer_batch(model, tokenizer, stop_ids, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                           batch_seed([keys[i] for i in mine])) if mine else []
        parts = [list(zip(mine, res))]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, list(zip(mine, res)))
        if rank == 0:
            for i, r in (x for part in parts for x in part):
                sink(i, r)
