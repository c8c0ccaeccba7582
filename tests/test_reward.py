"""porover/reward.py on tiny random sequence-classification models built here: batched scores equal one-at-a-time
scores (right padding, a sequence ending in the pad token), a named output of a multi-output model, the flag checks,
and the cache."""
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from porover import reward
from porover.store import Store
from tests.conftest import tiny_reward_model

PROMPT = [{"role": "user", "content": "Explain how a rainbow forms."}]
TEXTS = ["Light bends in raindrops.", "Sunlight is refracted and reflected inside raindrops, which splits it into its "
         "colours, and each colour leaves the drop at a slightly different angle.", "Rain.", "Prisms of water."]


def tiny_rm(tmp_path, smol_path, num_labels=1):
    model, tok = tiny_reward_model(smol_path, tmp_path / "rm", num_labels)
    return model, tok, str(tmp_path / "rm")


def by_hand(model, tok, text, column=-1):
    ids = reward.render(tok, PROMPT, text)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, column].item()


def items(texts):
    return [{"_messages": PROMPT, "_response": t} for t in texts]


def test_batched_scores_equal_one_at_a_time(tmp_path, smol_path):
    model, tok, path = tiny_rm(tmp_path, smol_path)
    cfg = reward.RewardConfig(reward_model=path, reward_batch_size=3)
    batch = items(TEXTS)
    counts = Counter()
    judge_id = reward.score(cfg, batch, Store(tmp_path / "cache.jsonl"), counts)
    assert [c["_reward"] for c in batch] == pytest.approx([by_hand(model, tok, t) for t in TEXTS], abs=1e-5)
    assert len({round(c["_reward"], 6) for c in batch}) == 4 and counts["reward_judged"] == 4
    assert judge_id.startswith(f"reward:{path}#") and judge_id.endswith("|logits:-1")
    again = items(TEXTS)
    reward.score(cfg, again, Store(tmp_path / "cache.jsonl"), counts)
    assert counts["reward_cached"] == 4 and [c["_reward"] for c in again] == [c["_reward"] for c in batch]


def test_a_sequence_ending_in_the_pad_token_is_scored_alone(tmp_path, smol_path, monkeypatch):
    """A decoder classifier reads the last token that is not the pad id: padding after a sequence that itself ends
    in that id would move its read position, so such a sequence is never padded."""
    model, tok, path = tiny_rm(tmp_path, smol_path)
    pad = tok.pad_token_id
    ids = {"a": [5, 6, 7, 8, 9, 10], "b": [5, 6, 7, pad], "c": [11, 12]}
    monkeypatch.setattr(reward, "render", lambda tok, messages, response: ids[response])
    scored = items(["a", "b", "c"])
    reward.score(reward.RewardConfig(reward_model=path), scored, Store(tmp_path / "c.jsonl"), Counter())
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids[k]])).logits[0, -1].item() for k in "abc"]
    assert [c["_reward"] for c in scored] == pytest.approx(alone, abs=1e-5)


def test_a_named_output_column(tmp_path, smol_path):
    model, tok, path = tiny_rm(tmp_path, smol_path, num_labels=3)
    cfg = reward.RewardConfig(reward_model=path, reward_output="logits:1")
    scored = items(TEXTS[:2])
    reward.score(cfg, scored, Store(tmp_path / "c.jsonl"), Counter())
    assert [c["_reward"] for c in scored] == pytest.approx([by_hand(model, tok, t, column=1) for t in TEXTS[:2]],
                                                           abs=1e-5)
    with pytest.raises(ValueError, match="logits has 3 columns; name one as logits:INDEX"):
        reward.read_output(SimpleNamespace(logits=torch.zeros(2, 3), keys=lambda: ["logits"]), "logits")
    out = SimpleNamespace(score=torch.tensor([[0.5], [1.5]]), rewards=torch.arange(6.0).reshape(2, 3),
                          keys=lambda: ["score", "rewards"])
    assert reward.read_output(out, "score").tolist() == [0.5, 1.5]  # ArmoRM's overall score, (B, 1)
    assert reward.read_output(out, "rewards:2").tolist() == [2.0, 5.0]  # one objective's column
    with pytest.raises(ValueError, match="has no 'logits' .*it has: score, rewards"):
        reward.read_output(out, "logits:0")


@pytest.mark.parametrize("kw,msg", [({"reward_output": "score"}, "--reward_output applies only with --reward_model"),
                                    ({"reward_trust_remote_code": True}, "--reward_trust_remote_code applies only"),
                                    ({"reward_model": "m", "reward_output": "logits:x"}, "expected ATTR or ATTR:INDEX"),
                                    ({"reward_model": "m", "reward_batch_size": 0}, "--reward_batch_size must")])
def test_flag_checks(kw, msg):
    errors = reward.reward_errors(reward.RewardConfig(**kw))
    assert any(msg in e for e in errors), errors
