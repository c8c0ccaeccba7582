"""Log-probs, the SFT loss and the preference losses: hand-computed values, fp32, padding invariance, global
token mean, and the checks of the loss table."""
import math

import pytest
import torch
import torch.nn.functional as F

from porover import chat, losses
from porover.label_logps import LabelLogps
from porover.losses import sequence_logps, sft_loss, token_logps
from tests.conftest import tiny_llama


def test_sft_loss_equals_hand_cross_entropy():
    """Vocabulary of 3; the response is tokens 1..2 of [0, 2, 1] (loss_mask [0, 1, 1]).
    Logits at position 0 = [0, 0, ln 2] predict token 2: p = 2/4 -> -ln(1/2) = ln 2.
    Logits at position 1 = [ln 3, 0, 0] predict token 1: p = 1/5 -> ln 5.
    Position 2's logits predict nothing. Mean over the 2 response tokens: (ln 2 + ln 5)/2 = ln(10)/2."""
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0], [9.0, 9.0, 9.0]]])
    ids, mask = torch.tensor([[0, 2, 1]]), torch.tensor([[0, 1, 1]])
    assert sft_loss(logits, ids, mask, num_tokens=2).item() == pytest.approx(math.log(10) / 2, abs=1e-6)
    assert sequence_logps(logits, ids, mask, "sum").item() == pytest.approx(-math.log(10), abs=1e-6)
    assert sequence_logps(logits, ids, mask, "mean").item() == pytest.approx(-math.log(10) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        sequence_logps(logits, ids, mask, "avg")


def test_logps_are_fp32_from_a_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    out = sequence_logps(logits, ids, mask, "sum")
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.double(), -1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(-1).sum(-1)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-4)


def _items(smol_tok, responses):
    tok, eot = smol_tok
    p = chat.encode_prompt(tok, [{"role": "user", "content": "Tell me something."}])
    return [chat.build_example(p, chat.encode_response(tok, r, eot), 512) for r in responses]


def test_padding_and_batch_partner_do_not_change_logps(smol_tok):
    model = tiny_llama().eval()
    tok, _ = smol_tok
    items = _items(smol_tok, ["Short.", "A much longer answer that goes on for quite a few more tokens than that."])

    def logps(batch_items):
        b = chat.collate(batch_items, tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return sequence_logps(logits, b["input_ids"], b["loss_mask"], "sum")

    alone = logps(items[:1])
    together = logps(items)
    # Other batching (padding, another partner) changes the float summation order: 1e-3 nats at most.
    assert torch.allclose(alone, together[:1], rtol=1e-6, atol=1e-3)
    assert torch.equal(logps(items[:1]), alone)                        # identical batching: exact
    # A wrong mask (padding counted) moves the sum by whole nats, far outside the tolerance.
    b = chat.collate(items, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    wrong = sequence_logps(logits, b["input_ids"], b["attention_mask"], "sum")
    assert (wrong[0] - alone[0]).abs() > 1.0


def test_global_token_mean_accumulation_equals_one_batch(smol_tok):
    """Four uneven responses: one batch of 4 versus 4 micro-batches of 1, each divided by the number of
    response tokens in the whole batch. A per-micro-batch mean would weight short responses more."""
    tok, _ = smol_tok
    items = _items(smol_tok, ["Yes.", "No, not at all, and here is why in some detail.", "Maybe so.",
                              "It depends on many things: the weather, the time and your mood."])
    n_tokens = sum(sum(it["loss_mask"]) for it in items)  # the first token is never a response token

    def grads(micro_batches):
        model = tiny_llama()
        for mb in micro_batches:
            b = chat.collate(mb, tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            sft_loss(logits, b["input_ids"], b["loss_mask"], n_tokens).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    one, accumulated = grads([items]), grads([[it] for it in items])
    for name in one:
        assert torch.allclose(one[name], accumulated[name], rtol=1e-5, atol=1e-8), name


def test_token_logps_is_the_plain_expression_and_zero_outside_mask():
    """token_logps equals, bit for bit, the plain expression its docstring names (log-softmax of the logits
    at position t, read at token t+1), with every position outside the response mask exactly 0."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    out = token_logps(logits, ids, mask)
    plain = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert out.shape == (2, 4)
    assert torch.equal(out, plain.masked_fill(~mask[:, 1:].bool(), 0.0))
    assert out[0].tolist() == [0.0, plain[0, 1].item(), plain[0, 2].item(), 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logps_matches_cross_entropy_in_values_and_gradient(dtype, monkeypatch):
    """LabelLogps (which keeps no fp32 copy of the logits) against the plain fp32 cross-entropy it replaced, in
    chunks of 3 rows with a remainder (10 rows), for fp32 and bf16 logits: the same log-probs (bit for bit: the
    same log-softmax per row) and the same gradient (up to fp32 rounding of logsumexp, and bf16 rounding)."""
    monkeypatch.setattr(LabelLogps, "CHUNK", 3 * 50)
    torch.manual_seed(0)
    x = (torch.randn(10, 50) * 4).to(dtype).requires_grad_()
    y, w = torch.randint(0, 50, (10,)), torch.randn(10)
    lean = LabelLogps.apply(x, y)
    (lean * w).sum().backward()
    g_lean, x.grad = x.grad, None
    plain = -F.cross_entropy(x.float(), y, reduction="none")
    (plain * w).sum().backward()
    assert lean.dtype == torch.float32 and torch.equal(lean, plain)
    assert g_lean.dtype == dtype and torch.allclose(g_lean.float(), x.grad.float(), rtol=1e-2 if dtype == torch.bfloat16
                                                    else 1e-5, atol=1e-6)
    assert torch.allclose(g_lean.float().sum(-1), torch.zeros(10), atol=1e-2)  # softmax - onehot sums to 0 per row


# ---- losses against hand-computed values --------------------------------------------------------------

@pytest.mark.parametrize("beta,h,dpo,dpo_ls,ipo,hinge,robust,simpo", [
    (0.1, -1, 0.744397, 0.734397, 36.0, 1.1, 0.756897, 1.387335),
    (0.1, 0, 0.693147, 0.693147, 25.0, 1.0, 0.693147, 1.313262),
    (0.1, 2, 0.598139, 0.618139, 9.0, 0.8, 0.573139, 1.171101),
    (0.5, -1, 0.974077, 0.924077, 4.0, 1.5, 1.036577, 1.701413),
    (0.5, 0, 0.693147, 0.693147, 1.0, 1.0, 0.693147, 1.313262),
    (0.5, 2, 0.313262, 0.413262, 1.0, 0.0, 0.188262, 0.693147),
])
def test_losses_by_hand(beta, h, dpo, dpo_ls, ipo, hinge, robust, simpo):
    """With S(x) = log(1 + e^x) = -log sigmoid(-x), and the margin h put on the chosen policy log-prob:
    dpo = S(-beta h); dpo with eps = 0.1: 0.9 S(-beta h) + 0.1 S(beta h); ipo = (h - 1/(2 beta))^2;
    hinge = max(0, 1 - beta h); robust (eps 0.1) = (0.9 S(-beta h) - 0.1 S(beta h)) / 0.8;
    simpo (gamma 1, reference-free, h = difference of mean log-probs) = S(-(beta h - 1)).
    E.g. beta 0.5, h 2: S(-1) = ln(1 + 1/e) = 0.313262; S(1) = 1.313262; robust (0.281936 - 0.131326)/0.8."""
    pc, pr, rc, rr = torch.tensor([float(h)]), torch.zeros(1), torch.zeros(1), torch.zeros(1)
    # The same h from non-zero reference log-probs: only the differences matter.
    pc2, pr2, rc2, rr2 = torch.tensor([h - 7.0]), torch.tensor([-3.0]), torch.tensor([-7.0]), torch.tensor([-3.0])
    for args in ((pc, pr, rc, rr), (pc2, pr2, rc2, rr2)):
        assert losses.dpo_loss(*args, beta).item() == pytest.approx(dpo, abs=1e-6)
        assert losses.dpo_loss(*args, beta, label_smoothing=0.1).item() == pytest.approx(dpo_ls, abs=1e-6)
        assert losses.ipo_loss(*args, beta).item() == pytest.approx(ipo, abs=1e-5)
        assert losses.hinge_loss(*args, beta).item() == pytest.approx(hinge, abs=1e-6)
        assert losses.robust_loss(*args, beta, label_smoothing=0.1).item() == pytest.approx(robust, abs=1e-6)
    assert losses.simpo_loss(pc, pr, None, None, beta, simpo_gamma=1.0).item() == pytest.approx(simpo, abs=1e-6)


# Chosen response of 2 tokens with log-probs (-1, -1), rejected of 4 tokens with (-1, -1, -1, -1), as the
# logits of one concatenated pair batch (chosen row first); the reference gives 0 to every response.
# Sum: h = -2 - (-4) = 2; token mean: h = -1 - (-1) = 0.
AGG_LOGITS = torch.zeros(2, 5, 2)
AGG_LOGITS[..., 1] = math.log(math.e - 1)  # softmax gives token 0 probability 1/e: log-prob -1
AGG_IDS = torch.zeros(2, 5, dtype=torch.long)
AGG_MASK = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])


def test_sum_and_mean_aggregation_feed_the_losses():
    """On the pair above. DPO at beta 0.5: sum S(-beta h) = S(-1) = ln(1 + 1/e) = 0.313262, mean S(0) = ln 2.
    IPO at beta 0.1 (1/(2 beta) = 5): sum (2 - 5)^2 = 9, mean (0 - 5)^2 = 25."""
    s = losses.sequence_logps(AGG_LOGITS, AGG_IDS, AGG_MASK, "sum")
    m = losses.sequence_logps(AGG_LOGITS, AGG_IDS, AGG_MASK, "mean")
    assert s.tolist() == pytest.approx([-2, -4]) and m.tolist() == pytest.approx([-1, -1])
    zero = torch.zeros(1)
    assert losses.dpo_loss(s[:1], s[1:], zero, zero, 0.5).item() == pytest.approx(0.313262, abs=1e-6)
    assert losses.dpo_loss(m[:1], m[1:], zero, zero, 0.5).item() == pytest.approx(math.log(2), abs=1e-6)
    assert losses.ipo_loss(s[:1], s[1:], zero, zero, 0.1).item() == pytest.approx(9.0, abs=1e-5)
    assert losses.ipo_loss(m[:1], m[1:], zero, zero, 0.1).item() == pytest.approx(25.0, abs=1e-5)


def test_a_loss_table_line_is_checked_against_its_function():
    """Options come from the function's signature: each needs a default, beta among them; a check may
    only name an option the loss takes."""
    def no_default(pc, pr, rc, rr, beta, width):
        return pc
    def no_beta(pc, pr, rc, rr, width=1.0):
        return pc
    for fn in (no_default, no_beta):
        with pytest.raises(TypeError, match="every parameter needs a default, and beta is one of them"):
            losses.PreferenceLoss(fn, "sum")
    with pytest.raises(TypeError, match=r"checks for options it does not take: \['gamma'\]"):
        losses.PreferenceLoss(losses.dpo_loss, "sum", {"gamma": losses.POSITIVE})


def test_dpo_defaults_to_porovers_beta_and_the_others_keep_theirs():
    """DPO's beta is POROver's 0.025: still ln 2 at h = 0, and S(-beta h) = S(-1) = 0.313262 at h = 40."""
    assert {k: v.defaults["beta"] for k, v in losses.PREFERENCE_LOSSES.items()} == \
        {"dpo": 0.025, "ipo": 0.1, "hinge": 0.1, "robust": 0.1, "simpo": 2.0}
    zero = torch.zeros(1)
    assert losses.dpo_loss(zero, zero, zero, zero).item() == pytest.approx(math.log(2), abs=1e-6)
    assert losses.dpo_loss(torch.tensor([40.0]), zero, zero, zero).item() == pytest.approx(0.313262, abs=1e-6)
