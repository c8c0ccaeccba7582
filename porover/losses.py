"""Log-probabilities of responses and the training losses.

Conventions: `logits` (B, T, V) come from the model on `input_ids` (B, T); `loss_mask` (B, T) is 1 on the
response tokens and the end-of-turn token (porover.chat). The logits at position t predict token t+1:
the shift happens once, here, and nowhere else. Log-softmax and sums run in fp32 whatever the model's
dtype (bf16 log-probs of a 200-token response are off by whole nats).
"""
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from porover.label_logps import LabelLogps


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | x, y_<t) at every response token, 0 elsewhere: (B, T-1) fp32. The same values (bit for
    bit) and gradient as the plain expression

        torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            .masked_fill(~loss_mask[:, 1:].bool(), 0.0)

    computed without its fp32 copy of the logits (porover.label_logps.LabelLogps)."""
    B, T, V = logits.shape
    # Position t predicts token t+1. Padding the labels (not slicing the logits) keeps the (B, T, V)
    # logits contiguous, so no copy of them is made; the last position's dummy label is dropped.
    labels = F.pad(input_ids[:, 1:], (0, 1))                     # (B, T)
    logps = LabelLogps.apply(logits.reshape(B * T, V), labels.reshape(-1))
    return logps.view(B, T)[:, :-1].masked_fill(~loss_mask[:, 1:].bool(), 0.0)  # (B, T-1)


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


# ---- Preference losses --------------------------------------------------------------------------------
# Each takes per-pair sequence log-probs, (B,) fp32 tensors, aggregated as the loss's `logp_agg` says
# (sum or token mean, see sequence_logps), then its options as keyword arguments with their defaults, and
# returns per-pair losses (B,); the trainer averages them over the global batch.
# h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)].

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.025,
             label_smoothing=0.0):
    """DPO, Rafailov et al. 2023, eq. 7: L = -log sigmoid(beta h). With label smoothing eps (conservative
    DPO, labels flipped with probability eps): L = -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    At initialisation (pi = ref, h = 0): L = ln 2 for every eps and beta. Default agg: sum; beta 0.025,
    POROver's (a weaker pull toward the reference than the common 0.1)."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """IPO, Azar et al. 2023, eq. 17 (beta plays tau's role): L = (h - 1/(2 beta))^2, regressing the
    log-ratio margin onto 1/(2 beta) instead of pushing it to infinity. At initialisation (h = 0):
    L = 1/(4 beta^2). Default agg: token mean (the convention of the HF preference-tuning write-up)."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """Hinge on the reference-normalised margin (the SLiC-style hinge applied to h, as in RSO, Liu et al.
    2023): L = max(0, 1 - beta h). Not SLiC-HF's reference-free calibration loss. At initialisation
    (h = 0): L = 1. Default agg: sum."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return torch.relu(1 - beta * h)


def robust_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
                label_smoothing=0.1):
    """Robust DPO (rDPO), Chowdhury et al. 2024, for preference labels flipped with known rate eps < 1/2:
    L = [(1-eps) (-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))] / (1 - 2 eps), an unbiased estimate
    of the clean-label DPO loss. At initialisation (h = 0): L = ln 2. Default agg: sum; eps 0.1."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=2.0,
               simpo_gamma=1.0):
    """SimPO, Meng et al. 2024, reference-free (the ref arguments are ignored, and None):
    L = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma), so the log-probs must be
    token means. At initialisation L = -log sigmoid(beta (mean_w - mean_l) - gamma), which is
    log(1 + e^gamma) = 1.313 when the two means are equal. Defaults: beta 2.0, gamma 1.0 (gamma/beta = 0.5)."""
    return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - simpo_gamma)


# ---- The table behind --loss ------------------------------------------------------------------------------
# A loss's options are its keyword parameters after the four log-prob tensors, defaults included, plus
# `logp_agg`; each is a flag of train_pref.py (a field of its Config, None meaning the loss's default).
# Setting an option the chosen loss does not take is an error, and so is a value its check refuses.

@dataclass(frozen=True)
class Check:
    ok: Callable[[Any], bool]
    rule: str  # completes "--NAME ...", e.g. "must be positive"


POSITIVE = Check(lambda v: v > 0, "must be positive")
SUM_OR_MEAN = Check(lambda v: v in ("sum", "mean"), "must be sum or mean")


@dataclass(frozen=True)
class PreferenceLoss:
    """One `--loss`: its function, the log-prob aggregation it is defined on (the default of --logp_agg:
    "sum" or "mean"), the checks of its options (--logp_agg's is SUM_OR_MEAN unless given), and whether it
    works without a reference model."""
    fn: Callable
    logp_agg: str
    checks: dict[str, Check] = field(default_factory=dict)
    reference_free: bool = False

    def __post_init__(self):
        if "beta" not in self.defaults or inspect.Parameter.empty in self.defaults.values():
            raise TypeError(f"{self.fn.__name__}: after the four log-prob tensors, every parameter needs a default, "
                            "and beta is one of them")
        if unknown := set(self.checks) - set(self.defaults):
            raise TypeError(f"{self.fn.__name__}: checks for options it does not take: {sorted(unknown)}")

    @property
    def defaults(self) -> dict:
        """{option: default}: logp_agg, then the function's parameters after the four log-prob tensors."""
        params = list(inspect.signature(self.fn).parameters.values())[4:]
        return {"logp_agg": self.logp_agg, **{p.name: p.default for p in params}}

    def options(self, name: str, given: dict) -> tuple[dict, list[str]]:
        """(options, errors) for `--loss name` from `given` (flag -> value, None when not set): the defaults
        overridden by what is set; an error for each set option this loss does not take, and each value
        its check refuses."""
        defaults = self.defaults
        errors = [f"--{k} is not used by --loss {name}" for k, v in given.items()
                  if v is not None and k not in defaults]
        opts = {k: d if given.get(k) is None else given[k] for k, d in defaults.items()}
        checks = {"logp_agg": SUM_OR_MEAN, **self.checks}
        return opts, errors + [f"--{k} {c.rule}" for k, c in checks.items() if not c.ok(opts[k])]


PREFERENCE_LOSSES = {
    "dpo": PreferenceLoss(dpo_loss, "sum", {"beta": POSITIVE, "label_smoothing": Check(
        lambda v: 0 <= v < 0.5, "must be in [0, 0.5) (0.5 and above flip the labels)")}),
    "ipo": PreferenceLoss(ipo_loss, "mean", {"beta": POSITIVE}),
    "hinge": PreferenceLoss(hinge_loss, "sum", {"beta": POSITIVE}),
    "robust": PreferenceLoss(robust_loss, "sum", {"beta": POSITIVE, "label_smoothing": Check(
        lambda v: 0 < v < 0.5, "is the label-noise rate of --loss robust: 0 < it < 0.5")}),
    "simpo": PreferenceLoss(simpo_loss, "mean", {"beta": POSITIVE, "logp_agg": Check(
        lambda v: v == "mean", "must be mean: SimPO is defined on length-normalised log-probs")}, reference_free=True),
}


def nll_term(policy_chosen_token_mean_logps):
    """RPO's NLL term (Pang et al. 2024): -(1/|y_w|) log pi(y_w|x) per pair, added with weight
    --nll_weight to keep the chosen likelihood from falling, which DPO often lets happen."""
    return -policy_chosen_token_mean_logps
