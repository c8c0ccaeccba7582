"""Run by test_distributed.py under torchrun or python: train_sft's first-step gradients, saved by rank 0."""
import sys
from contextlib import nullcontext
from functools import partial

from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import train_sft
from porover import chat, dist, models
from porover.training import global_batch

model_dir, data, out, batch_size, grad_accum = sys.argv[1:6]
rank, world, device = dist.setup()
cfg = train_sft.Config(model=model_dir, data=data, batch_size=int(batch_size), grad_accum=int(grad_accum),
                       max_length=128)
tok = models.load_tokenizer(model_dir)
items, _ = train_sft.load_split(data, tok, chat.prepare_tokenizer(tok), cfg, "train")
model = models.load_model(model_dir)
wrapped = DDP(model) if world > 1 else model
batches, _, _, _ = global_batch(items, [len(it["input_ids"]) for it in items], 0, cfg, rank, world,
                                partial(chat.collate, pad_id=tok.pad_token_id), train_sft.stand_in)
tokens = dist.all_reduce_sum([sum(b["loss_mask"][:, 1:].sum().item() for b in batches)], device)[0]
train_sft.accumulate(wrapped, batches, tokens, world, nullcontext(), device)
if rank == 0:
    save_file({n: p.grad.contiguous() for n, p in model.named_parameters()}, out)
dist.teardown()
