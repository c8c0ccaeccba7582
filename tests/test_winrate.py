"""porover.winrate through the loopback OpenAI-compatible server: a scripted judge that decides by the answers' text
(so the position swap is exercised), ties, unparseable replies, failed requests retried on the next run, a cached
rerun, ids missing on either side, and the bootstrap interval checked against the exact bootstrap distribution."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from porover import winrate
from porover.config import parse
from porover.data import DataError
from tests import openai_server
from tests.openai_server import FakeOpenAI


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def files(tmp_path, ids, ref_ids=None):
    """The model answers "model answer to <id>", the references "reference answer to <id>"."""
    src = write_jsonl(tmp_path / "responses.jsonl", [{"id": i, "prompt": f"question {i}", "type": "general",
                                                      "response": f"model answer to {i}"} for i in ids])
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": i, "prompt": f"question {i}",
                                                  "response": f"reference answer to {i}"} for i in ref_ids or ids])
    return src, refs


def sections(content):
    """(instruction, answer A, answer B) out of a prompt built from the built-in template."""
    instruction = content.split("[INSTRUCTION]\n", 1)[1].split("\n\n[ANSWER A]\n", 1)[0]
    a = content.split("[ANSWER A]\n", 1)[1].split("\n\n[ANSWER B]\n", 1)[0]
    b = content.split("[ANSWER B]\n", 1)[1].split("\n\nReply with", 1)[0]
    return instruction, a, b


@pytest.fixture
def judge(monkeypatch):
    """judge(decide): the server replies decide(instruction, answer A, answer B)."""
    def install(decide):
        monkeypatch.setattr(openai_server, "reply_text",
                            lambda body, choice: decide(*sections(body["messages"][-1]["content"])))
    return install


def config(tmp_path, src, refs, server, **kw):
    return winrate.WinRateConfig(input=src, references=refs, output=str(tmp_path / "winrate.json"),
                                 judge_model="judge-1", judge_base_url=server.base_url, n_boot=200, **kw)


def test_a_judge_that_always_says_a_gives_all_ties(tmp_path, judge):
    judge(lambda i, a, b: "A")
    src, refs = files(tmp_path, [f"p{k}" for k in range(4)])
    with FakeOpenAI() as server:
        res = winrate.winrate(config(tmp_path, src, refs, server))
        assert len(server.log) == 8
        body = server.log[0]["body"]
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-1", 0.0, 16)
    model_first = [sections(e["body"]["messages"][-1]["content"])[1].startswith("model") for e in server.log]
    assert sorted(model_first) == [False] * 4 + [True] * 4  # every prompt in both orders
    assert (res["win_rate"], res["n"], res["ties"], res["wins"], res["losses"]) == (0.5, 4, 4, 0, 0)
    assert res["interval"]["lo"] == res["interval"]["hi"] == 0.5
    assert "does not reproduce AlpacaEval 2.0" in res["note"] and res["input_sha256"].keys() == {"input", "references"}
    assert res["judge"].startswith(f"pairwise:judge-1@{winrate.TEMPLATE_ID}|127.0.0.1:")
    lines = read(tmp_path / "winrate.judgements.jsonl")
    assert {(r["verdict_model_a"], r["verdict_model_b"], r["outcome"], r["score"]) for r in lines} == {
        ("A", "A", "tie", 0.5)}  # the judge's own words: A (the model) then A (the reference)


def test_a_judge_preferring_the_model_in_both_orders_gives_wins(tmp_path, judge):
    judge(lambda i, a, b: "A" if a.startswith("model") else "B")
    src, refs = files(tmp_path, ["p0", "p1", "p2"])
    with FakeOpenAI() as server:
        res = winrate.winrate(config(tmp_path, src, refs, server))
        assert (res["win_rate"], res["wins"], res["n"], res["interval"]["lo"]) == (1.0, 3, 3, 1.0)
        winrate.winrate(config(tmp_path, src, refs, server))
        assert len(server.log) == 6  # the rerun asked nothing
        winrate.winrate(config(tmp_path, src, refs, server, judge_max_tokens=8))
        assert len(server.log) == 12  # another judge id: asked again, never a stale verdict


def test_ties_unparseable_failures_missing_ids_and_rerun(tmp_path, judge):
    def decide(instruction, a, b):
        model_is_a = a.startswith("model")
        kind = instruction.removeprefix("question q-")
        return {"win": "A" if model_is_a else "B", "loss": "B" if model_is_a else "A", "tie": "Tie.",
                "pos": "A", "garbage": "A is better", "fail": "**A**" if model_is_a else "b"}[kind]
    judge(decide)
    fail = {"on": True}

    def script(entry, server):
        _, a, _ = sections(entry["body"]["messages"][-1]["content"])
        if fail["on"] and a == "model answer to q-fail":
            return {"status": 400, "error": {"message": "scripted refusal"}}
    kinds = ["q-win", "q-loss", "q-tie", "q-pos", "q-garbage", "q-fail"]
    src, refs = files(tmp_path, kinds + ["q-noref"], kinds + ["q-noresp"])
    with FakeOpenAI(script) as server:
        cfg = config(tmp_path, src, refs, server)
        res = winrate.winrate(cfg)
        assert len(server.log) == 12
        assert (res["wins"], res["losses"], res["ties"], res["unparseable"], res["failed"], res["n"]) == (1, 1, 2, 1, 1, 4)
        assert res["win_rate"] == 0.5 and res["prompts"] == 6
        assert res["missing"] == {"no_reference": {"n": 1, "ids": ["q-noref"]}, "no_response": {"n": 1, "ids": ["q-noresp"]}}
        assert res["requests"]["failed"] == 1 and res["requests"]["asked"] == 11
        lines = {r["id"]: r for r in read(tmp_path / "winrate.judgements.jsonl")}
        assert lines["q-garbage"]["status"] == "unparseable" and lines["q-garbage"]["raw_model_a"] == "A is better"
        assert lines["q-fail"]["status"] == "failed" and "400" in lines["q-fail"]["error"]
        assert lines["q-fail"]["verdict_model_b"] == "B"  # the order that succeeded is kept
        fail["on"] = False
        res = winrate.winrate(cfg)  # only the failed request is sent again
        assert len(server.log) == 13 and sections(server.log[-1]["body"]["messages"][-1]["content"])[1] == \
            "model answer to q-fail"
        assert (res["wins"], res["failed"], res["n"], res["win_rate"]) == (2, 0, 5, 0.6)
        winrate.winrate(cfg)
        assert len(server.log) == 13


def test_interval_is_the_bootstrap_over_prompts(tmp_path, judge):
    """Three wins and a tie: scores 1, 1, 1, 0.5. The exact bootstrap distribution of the mean (all 4^4 resamples)
    puts 1/256 on 0.5, 12/256 on 0.625 and 81/256 on 1: its 2.5% quantile is 0.625 and its 97.5% quantile 1."""
    judge(lambda i, a, b: "tie" if "p3" in i else "A" if a.startswith("model") else "B")
    src, refs = files(tmp_path, ["p0", "p1", "p2", "p3"])
    scores = [1, 1, 1, 0.5]
    means = sorted(np.mean([scores[j] for j in draw]) for draw in itertools.product(range(4), repeat=4))
    lo, hi = means[int(0.025 * 256)], means[int(0.975 * 256)]
    assert (lo, hi) == (0.625, 1.0)
    with FakeOpenAI() as server:
        res = winrate.winrate(winrate.WinRateConfig(input=src, references=refs, output=str(tmp_path / "w.json"),
                                                    judge_model="j", judge_base_url=server.base_url, seed=3))
    assert (res["win_rate"], res["ties"]) == (0.875, 1)
    assert (res["interval"]["lo"], res["interval"]["hi"]) == (lo, hi) and res["interval"]["n_boot"] == 2000


def test_verdicts_outcomes_and_templates(tmp_path, judge):
    assert [winrate.parse_verdict(t) for t in ("A", " b\n", "**Tie**", "'A'.", "A is better", "AB", "", None)] == [
        "A", "B", "tie", "A", "unparseable", "unparseable", "unparseable", "unparseable"]
    assert [winrate.outcome(x, y) for x, y in (("A", "B"), ("A", "tie"), ("tie", "B"), ("B", "A"), ("tie", "A"),
                                               ("A", "A"), ("tie", "tie"), ("A", "unparseable"))] == [
        "win", "win", "win", "loss", "loss", "tie", "tie", None]
    bad = tmp_path / "bad.txt"
    bad.write_text("Which is better? {instruction}\n{output_a}\n")
    with pytest.raises(ValueError, match=r"lacks the placeholders \['output_b'\]"):
        winrate.template(str(bad))
    good = tmp_path / "good.txt"
    good.write_text("[INSTRUCTION]\n{instruction}\n\n[ANSWER A]\n{output_a}\n\n[ANSWER B]\n{output_b}\n\nReply with it")
    assert winrate.template(str(good))[1].startswith("file-")
    # One pass: an answer containing a placeholder is not substituted again.
    assert winrate.fill(good.read_text(), "q", "{output_b}", "x").count("{output_b}") == 1


def test_flags_and_broken_inputs(tmp_path):
    cfg = parse(winrate.WinRateConfig, ["--input", "r.jsonl", "--references", "ref.jsonl", "--output", "w.json",
                                        "--judge_model", "gpt-4o", "--judge_max_tokens", "8"])
    assert (cfg.judge_model, cfg.judge_max_tokens, cfg.judge_concurrency) == ("gpt-4o", 8, 16)
    with pytest.raises(ValueError, match="--judge_model is required"):
        winrate.winrate(winrate.WinRateConfig(input="r", references="f", output="o"))
    src, refs = files(tmp_path, ["p0"])
    cfg = winrate.WinRateConfig(input=src, references=refs, output=str(tmp_path / "w.json"), judge_model="j",
                                judge_base_url="http://127.0.0.1:9/v1")
    write_jsonl(refs, [{"id": "p0", "prompt": "another question", "response": "r"}])
    with pytest.raises(DataError, match="refs.jsonl:1: id 'p0' has another prompt"):
        winrate.winrate(cfg)
    write_jsonl(refs, [{"id": "p0", "response": "r"}, {"id": "p0", "response": "s"}])
    with pytest.raises(DataError, match="refs.jsonl:2: field 'id': 'p0' already on line 1"):
        winrate.winrate(cfg)
    write_jsonl(refs, [{"id": "p0", "messages": [{"role": "user", "content": "question p0"}], "response": None}])
    with pytest.raises(DataError, match="refs.jsonl:1: field 'response' must be a string"):
        winrate.winrate(cfg)
