"""Log-probabilities of responses and the training losses.

Conventions: `logits` (B, T, V) come from the model on `input_ids` (B, T); `loss_mask` (B, T) is 1 on the
response tokens and the end-of-turn token (porover.chat). The logits at position t predict token t+1:
the shift happens once, here, and nowhere else. Log-softmax and sums run in fp32 whatever the model's
dtype (bf16 log-probs of a 200-token response are off by whole nats).
"""
import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | x, y_<t) at every response token, 0 elsewhere: (B, T-1) fp32."""
    labels = input_ids[:, 1:]                                    # (B, T-1)
    mask = loss_mask[:, 1:].bool()                               # (B, T-1)
    logits = logits[:, :-1].float()                              # (B, T-1, V)
    logps = -F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    return logps.masked_fill(~mask, 0.0)


def sequence_logps(logits, input_ids, loss_mask, agg: str) -> torch.Tensor:
    """log pi(y|x) per sequence, (B,) fp32: `agg="sum"` is sum_t log pi(y_t|...), `agg="mean"` divides by
    the number of response tokens (length-normalised, as IPO and SimPO use it). No default: the choice
    changes every preference loss, so callers state it."""
    logps = token_logps(logits, input_ids, loss_mask)            # (B, T-1)
    if agg == "sum":
        return logps.sum(-1)
    if agg == "mean":
        return logps.sum(-1) / loss_mask[:, 1:].sum(-1).clamp(min=1)
    raise ValueError(f"agg must be 'sum' or 'mean', got {agg!r}")


def sft_loss(logits, input_ids, loss_mask, num_tokens: int | float) -> torch.Tensor:
    """Negative log-likelihood of the response tokens, summed here and divided by `num_tokens`, the number
    of response tokens in the whole global batch (all micro-batches, all ranks):

        L = -(1/N) sum_{i in batch} sum_{t in response_i} log pi(y_t | x, y_<t)

    so that gradient accumulation and data parallelism give the same update as one big batch, and long
    responses weigh per token, not per example. At initialisation (uniform logits) L = ln V.
    """
    return -token_logps(logits, input_ids, loss_mask).sum() / num_tokens
