"""Reward-model scores, as the paper uses them to pick the best of a teacher's candidates.

Any transformers `AutoModelForSequenceClassification` loads (a local folder or a hub id the user names): the
OpenAssistant DeBERTa-v3-large reward model v2 the paper uses has one logit, the default `--reward_output
logits:-1`. A multi-objective model exposes its objectives as other outputs: ArmoRM-Llama3-8B-v0.1 returns
`rewards` (one column per objective: the paper's helpfulness objective is UltraFeedback's, its safety objective
BeaverTails') and `score` (the overall preference), so `--reward_output rewards:INDEX` or `--reward_output score`
reads one of them (the column order is on its model card). ArmoRM's head is custom code in its repository: it loads
only with `--reward_trust_remote_code`, which runs that code on your machine; porover never turns it on itself.

The conversation is rendered with the reward model's own chat template (or, without one, the turns joined by a
blank line), right-padded in batches of similar length; scores are cached like every judge's answer.
"""
import functools
from collections import Counter
from dataclasses import dataclass

from porover.store import Store


@dataclass
class RewardConfig:
    """The reward model flags that overgen.py select and pairs share."""
    reward_model: str | None = None  # a sequence-classification model (folder or hub id): picks the best candidate
    reward_output: str = "logits:-1"  # ATTR or ATTR:INDEX of the model's output, e.g. score, rewards:9
    reward_trust_remote_code: bool = False  # run the model repository's own code (ArmoRM needs it): opt-in only
    reward_batch_size: int = 8


def reward_errors(cfg: RewardConfig) -> list[str]:
    unused = [f"--{k} applies only with --reward_model" for k in ("reward_output", "reward_trust_remote_code",
                                                                   "reward_batch_size")
              if not cfg.reward_model and getattr(cfg, k) != getattr(RewardConfig, k)]
    attr, _, index = cfg.reward_output.partition(":")
    if not attr.isidentifier() or index and not index.lstrip("-").isdigit():
        unused.append(f"--reward_output {cfg.reward_output!r}: expected ATTR or ATTR:INDEX (e.g. logits:-1, score)")
    if cfg.reward_batch_size < 1:
        unused.append("--reward_batch_size must be at least 1")
    return unused


def read_output(output, spec: str):
    """The (B,) scores named by `spec` ("logits:-1", "score", "rewards:9") from a model's output."""
    attr, _, index = spec.partition(":")
    value = getattr(output, attr, None)
    if value is None:
        raise ValueError(f"--reward_output {spec!r}: the reward model's output has no {attr!r} "
                         f"(it has: {', '.join(k for k in output.keys())})")
    value = value.float()
    if value.dim() == 2:  # (B, K): one column
        if not index and value.shape[1] > 1:
            raise ValueError(f"--reward_output {spec!r}: {attr} has {value.shape[1]} columns; name one as {attr}:INDEX")
        value = value[:, int(index or -1)]
    return value.reshape(-1)  # (B,)


def render(tokenizer, messages: list[dict], response: str) -> list[int]:
    conv = messages + [{"role": "assistant", "content": response}]
    if tokenizer.chat_template:
        return tokenizer(tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False).input_ids
    return tokenizer("\n\n".join(m["content"] for m in conv)).input_ids


def scorer(cfg: RewardConfig):
    """score(todo, put): batches of similar length, right-padded (a classifier reading the first token, like
    DeBERTa, and one reading the last non-pad token, like Llama, both see their token). A sequence that ends in the
    pad token is scored alone, where no padding can hide its end."""
    def score(todo, put):
        import torch

        from porover import generation
        tok, model = load(cfg.reward_model, cfg.reward_trust_remote_code, generation.identity(cfg.reward_model))
        pad = model.config.pad_token_id  # the id the model itself takes for padding
        ids = {id(c): render(tok, c["_messages"], c["_response"]) for c in todo}
        alone = [c for c in todo if ids[id(c)][-1] == pad]
        rest = sorted((c for c in todo if ids[id(c)][-1] != pad), key=lambda c: len(ids[id(c)]))
        batches = [rest[i:i + cfg.reward_batch_size] for i in range(0, len(rest), cfg.reward_batch_size)]
        for batch in batches + [[c] for c in alone]:
            T = max(len(ids[id(c)]) for c in batch)
            input_ids = torch.tensor([ids[id(c)] + [pad] * (T - len(ids[id(c)])) for c in batch])  # (B, T)
            mask = torch.tensor([[1] * len(ids[id(c)]) + [0] * (T - len(ids[id(c)])) for c in batch])  # (B, T)
            with torch.no_grad():
                out = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device))
            for c, r in zip(batch, read_output(out, cfg.reward_output).tolist()):
                put(c, {"reward": r})
    return score


@functools.cache
def load(path: str, trust_remote_code: bool, version: str):
    """(tokenizer, model), once per process and model version (as porover.judging loads a Llama Guard)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from porover import generation, models
    device, dtype = generation.device_and_dtype()
    local = models.resolve_model(path)
    model = AutoModelForSequenceClassification.from_pretrained(local, dtype=dtype, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:  # a decoder classifier finds each sequence's last token by the pad id
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return tok, model.to(device).eval()


def score(cfg: RewardConfig, items: list[dict], cache: Store, counts: Counter) -> str:
    """item["_reward"] = the reward model's score of its conversation (cached); returns the model's id."""
    from porover import generation, judging
    judge_id = f"reward:{generation.identity(cfg.reward_model)}|{cfg.reward_output}"
    judging.cached("reward", judge_id, items, scorer(cfg), cache, counts)
    for c in items:
        c["_reward"] = (c.pop("_answer") or {}).get("reward")
    return judge_id
