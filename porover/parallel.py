"""How a model runs on one or many devices: data parallelism (DDP or FSDP2), gradient checkpointing,
compilation, precision, gradient sync and clipping, and the FLOP count behind MFU (README "Distributed
training"). Both trainers call these; nothing here knows about data, schedules or checkpoints."""
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP


def precision(cfg, device):
    """(dtype name, autocast context) for a TrainConfig: bf16 compute over fp32 master weights on CUDA by
    default, fp32 on CPU. Under FSDP2 its mixed-precision policy casts instead of autocast. Log-softmax and
    log-prob sums stay fp32 either way (porover.losses)."""
    dtype = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return dtype, torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16" and cfg.strategy == "ddp")


def decoder_layers(model) -> list:
    """The repeated blocks of a transformers model (the classes it names in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers to shard or compile")
    return layers


def disable_dropout(model):
    """Every dropout of a transformers model set to 0 (nn.Dropout modules and the attention's float rate)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def shard(model, dtype: str, offload: bool = False):
    """FSDP2: fully_shard each decoder layer, then the root (which owns embeddings, final norm and lm_head,
    so tied weights stay in one unit). bf16 compute with fp32 master weights and fp32 gradient reduction."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bf16" else None, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp, "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    return fully_shard(model, **kw)


def wrap(model, cfg, device, world, dtype: str):
    """Gradient checkpointing, compilation and data parallelism (DDP or FSDP2, as the TrainConfig says)
    around the fp32 master model."""
    if cfg.grad_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        for layer in decoder_layers(model):
            layer.compile()
    model.train()
    if cfg.strategy == "fsdp":
        return shard(model, dtype)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model


def grad_sync(model, last: bool):
    """Gradients are reduced across ranks only at the last micro-step (nanoGPT's trick, for DDP and FSDP2)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last or not isinstance(model, DDP) else model.no_sync()


def clip_grad_norm(model, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a DTensor under FSDP2


# Dense bf16 peak FLOP/s per device (SXM parts), for MFU; other devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(model, online_reference: bool) -> int:
    """MFU's numerator per trained token: 6N (forward and backward) + 2N for an online reference forward,
    N = parameters without the input embedding but with lm_head (counted even when tied to it)."""
    inner = getattr(model, "module", model)
    n = sum(p.numel() for p in inner.parameters())  # tied weights are listed once: as lm_head
    if not getattr(inner.config, "tie_word_embeddings", False):
        n -= inner.get_input_embeddings().weight.numel()
    return (6 + 2 * online_reference) * n


def mfu(flops_token: int, tokens: float, step_time: float, world: int) -> dict:
    """{"mfu": achieved / peak FLOP/s} on a CUDA device with a known peak, else {} (CPU: no MFU)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return {"mfu": flops_token * tokens / step_time / (peak * world)} if peak else {}
