"""Reference-model log-probs for preference losses: computed online in the policy's forward code path, or
precomputed once (--precompute_ref) and cached.

The cache is a safetensors file named by a fingerprint of the reference (its weights, config, tokenizer,
chat template, dtype) and holding one (chosen, rejected) pair of summed log-probs per training pair, keyed by a
hash of the pair's token ids and length settings. Any change to weights or tokenizer starts a new file;
a changed data line or length setting changes that pair's key: only what changed is recomputed.
"""
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from porover import dist
from porover.losses import token_logps


def sequence_stats(model, batch, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (fp32) and response token counts, each (2B,) for a pair batch."""
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    # The (2B, T, V) logits die with this frame: only the (2B, T-1) token log-probs leave it.
    return token_logps(logits, batch["input_ids"], batch["loss_mask"]).sum(-1), batch["loss_mask"][:, 1:].sum(-1)


def pair_key(pair: dict, max_length: int, max_prompt_length: int | None) -> str:
    blob = json.dumps([pair["chosen"]["input_ids"], pair["chosen"]["loss_mask"], pair["rejected"]["input_ids"],
                       pair["rejected"]["loss_mask"], max_length, max_prompt_length])
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint(model, tokenizer, dtype: str, strategy: str, device_type: str) -> str:
    """Hash of the reference's weights (every tensor's bytes), architecture config (rope_theta, rms_norm_eps and
    the like change the log-probs as surely as the weights), tokenizer and chat template, and what changes its
    numerics: dtype, strategy (DDP autocasts, FSDP2 casts parameters) and device type."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items()  # not where it was loaded from or by which version
              if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.all_special_tokens, dtype, strategy, device_type]).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def precompute(ref_model, pairs, keys, cache_file: Path, batch_size, collate, device, autocast):
    """(N, 2) summed reference log-probs (chosen, rejected) for `pairs`, from the cache where present, and
    how many were computed.
    Under torchrun each rank computes its share of the missing pairs; rank 0 writes the merged cache."""
    t0 = time.perf_counter()
    cache = load_file(cache_file) if cache_file.exists() else {}
    missing = [i for i, k in enumerate(keys) if k not in cache]
    mine = missing[dist.rank()::dist.world_size()]
    computed = {}
    # Every rank runs the same number of forwards (FSDP2 gathers parameters in each), the short ones on a
    # stand-in whose result is dropped.
    for s in range(0, -(-len(missing) // dist.world_size()) if missing else 0, batch_size):
        idx = mine[s:s + batch_size]
        batch = collate([pairs[i] for i in idx] or [pairs[0]])
        sums, _ = sequence_stats(ref_model, {k: v.to(device) for k, v in batch.items()}, autocast)
        for j, i in enumerate(idx):
            computed[keys[i]] = torch.stack([sums[j], sums[j + len(idx)]]).double().cpu()
    if tdist.is_initialized():
        gathered = [None] * dist.world_size()
        tdist.all_gather_object(gathered, computed)
        computed = {k: v for part in gathered for k, v in part.items()}
    cache.update(computed)
    if computed and dist.rank() == 0:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".tmp")
        save_file(cache, tmp)
        os.replace(tmp, cache_file)
    dist.barrier()
    dist.print0(f"reference log-probs: {len(keys) - len(missing)} cached, {len(missing)} computed in "
                f"{time.perf_counter() - t0:.1f} s ({cache_file})")
    return torch.stack([cache[k] for k in keys]), len(missing)
