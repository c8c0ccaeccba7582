"""The memory-saving kernel under porover.losses.token_logps: per-token log-probs from the logits without
an fp32 copy of them (bench/logps_memory.py measures the difference)."""
import torch


class LabelLogps(torch.autograd.Function):
    """log softmax(logits)[label] per row, (N,) fp32, from (N, V) logits of any float dtype.

    The same values and gradient as -F.cross_entropy(logits.float(), labels, reduction="none"), with less
    memory: that one keeps an fp32 copy and an fp32 log-softmax of the logits (8 bytes x vocab per token;
    ~1 GB per 2048-token sequence at a 128k vocabulary), this one only the logits themselves and one
    logsumexp per row, and works in fp32 chunks of 2^26 elements (bench/logps_memory.py measures both).
        forward:  logp = x_y - logsumexp(x)        backward:  d logp / dx = onehot(y) - softmax(x)
    """
    CHUNK = 2**26  # elements: large chunks keep the CPU kernels at full speed

    @staticmethod
    def forward(ctx, logits, labels):
        rows = max(1, LabelLogps.CHUNK // logits.shape[1])
        logp = torch.cat([torch.log_softmax(x.float(), -1).gather(1, y[:, None]).squeeze(1)
                          for x, y in zip(logits.split(rows), labels.split(rows))])   # (N,)
        lse = logits.gather(1, labels[:, None]).squeeze(1).float() - logp          # (N,) logsumexp
        ctx.save_for_backward(logits, labels, lse)
        return logp

    @staticmethod
    def backward(ctx, grad):  # grad (N,)
        logits, labels, lse = ctx.saved_tensors
        out, rows = torch.empty_like(logits), max(1, LabelLogps.CHUNK // logits.shape[1])
        for s in range(0, len(logits), rows):
            x, y, g = logits[s:s + rows], labels[s:s + rows, None], grad[s:s + rows, None]
            # fp32 work space: the gradient's own rows when it is fp32, else a chunk copied into it afterwards
            d = out[s:s + rows] if out.dtype == torch.float32 else torch.empty(x.shape, device=x.device)
            torch.sub(x, lse[s:s + rows, None], out=d).exp_().mul_(-g).scatter_add_(1, y, g)  # (onehot - p) g
            if out.dtype != torch.float32:
                out[s:s + rows] = d
        return out, None
