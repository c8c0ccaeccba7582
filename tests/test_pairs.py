"""POROver's preference pairs: the paper's rules on hand-made judged candidates (porover/pairs.py: overrefusal,
reward-model choice, the containment threshold), and overgen.py overrefused and pairs end to end on hand-made
student and teacher files (keyword judge and proxy; served and local Llama Guard), counts exact, output readable by
train_pref.py."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import overgen
from porover.config import parse
from porover import judges, models, pairs
from porover.data import DataError, read_pref
from tests import openai_server
from tests.conftest import tiny_llama, tiny_reward_model
from tests.openai_server import FakeOpenAI


def cand(text, slot=0, refusal=False, p_unsafe=None, unsafe=None, status="ok", finish="stop", reward=None):
    return {"text": text, "slot": slot, "status": status, "finish_reason": finish, "_refusal": refusal,
            "_refusal_label": "full_refusal" if refusal else "compliance", "_p_unsafe": p_unsafe, "_unsafe": unsafe,
            "_safety": None if p_unsafe is None else {"p_unsafe": p_unsafe}, "_reward": reward}


def scored(text, s, slot=0, finish="stop"):
    """A toxic-prompt candidate with Llama Guard's safety score s = 1 - p_unsafe."""
    return cand(text, slot=slot, p_unsafe=1 - s, unsafe=s < 0.5, finish=finish)


def proxied(text, refusal, slot=0):
    """A toxic-prompt candidate scored by the offline proxy: s = 1 for a refusal, 0 for a compliance."""
    return {**cand(text, slot=slot, refusal=refusal, unsafe=not refusal), "_safety": judges.proxy_safety(refusal, True)}


def student(n_refusals, k=4, **kw):
    return [cand(f"refusal {i}" if i < n_refusals else f"answer {i}", slot=i, refusal=i < n_refusals, **kw)
            for i in range(k)]


TEACHER = [cand("I can't.", slot=0, refusal=True, reward=5.0),
           cand("Use kill -9 PID.", slot=1, reward=1.0),
           cand("Use pkill NAME.", slot=2, reward=2.0)]


@pytest.mark.parametrize("n_refusals,tau,outcome", [(2, 0.5, "pair"), (1, 0.5, "not_overrefused"),
                                                     (3, 0.75, "pair"), (2, 0.75, "not_overrefused"),
                                                     (4, 1.0, "pair"), (0, 0.25, "not_overrefused")])
def test_overrefused_when_the_refusal_fraction_reaches_tau(n_refusals, tau, outcome):
    pair, why = pairs.overrefusal_pair(student(n_refusals), TEACHER, 4, tau, False, random.Random(0))
    assert why == outcome and (pair is not None) == (outcome == "pair")
    if pair:
        assert pair["refusal_fraction"] == n_refusals / 4


def test_the_paper_default_is_one_answer_that_is_a_refusal():
    rng = random.Random(0)
    assert pairs.overrefusal_pair(student(1, k=1), TEACHER, 1, 0.5, False, rng)[1] == "pair"
    assert pairs.overrefusal_pair(student(0, k=1), TEACHER, 1, 0.5, False, rng)[1] == "not_overrefused"
    assert pairs.overrefusal_pair(student(0, k=1), TEACHER, 1, 0.01, False, rng)[1] == "not_overrefused"  # 0 refusals


def test_chosen_is_the_best_compliant_teacher_answer_by_reward():
    for seed in range(10):  # the refusal's reward (5.0) is the highest, but refusals are dropped first
        pair, _ = pairs.overrefusal_pair(student(3), TEACHER, 4, 0.5, True, random.Random(seed))
        assert pair["chosen"]["text"] == "Use pkill NAME." and pair["rejected"]["_refusal"] is True
    tied = TEACHER[:2] + [cand("Use pkill NAME.", slot=2, reward=1.0)]
    chosen = {pairs.overrefusal_pair(student(3), tied, 4, 0.5, True, random.Random(s))[0]["chosen"]["slot"]
              for s in range(20)}
    assert chosen == {1, 2}  # a tie falls to the seeded choice
    unscored = [cand("Use kill.", slot=0)]  # a reward model was asked but its score failed: never guessed
    assert pairs.overrefusal_pair(student(3), unscored, 4, 0.5, True, random.Random(0))[1] == "no_scored_teacher_answer"


def test_without_a_reward_model_chosen_and_rejected_are_seeded_choices():
    seen = {(p["chosen"]["slot"], p["rejected"]["slot"]) for p, _ in
            (pairs.overrefusal_pair(student(3), TEACHER, 4, 0.5, False, random.Random(s)) for s in range(40))}
    assert {c for c, _ in seen} == {1, 2} and {r for _, r in seen} == {0, 1, 2}
    assert pairs.overrefusal_pair(student(3), TEACHER, 4, 0.5, False, random.Random(7)) == \
        pairs.overrefusal_pair(student(3), TEACHER, 4, 0.5, False, random.Random(7))


def test_the_refusal_fraction_needs_k_usable_judged_samples():
    rng = random.Random(0)
    s = student(4, k=6)
    assert pairs.overrefusal_pair(s[:3], TEACHER, 4, 0.5, False, rng)[1] == "student_fewer_than_k"
    assert pairs.overrefusal_pair(s[:2] + s[4:], TEACHER, 4, 0.5, False, rng)[1] == "student_fewer_than_k"
    failed = student(2)
    failed[3] = cand("", slot=3, status="failed")
    assert pairs.overrefusal_pair(failed, TEACHER, 4, 0.5, False, rng)[1] == "student_fewer_than_k"
    unjudged = student(2)
    unjudged[3]["_refusal"] = None
    assert pairs.overrefusal_pair(unjudged, TEACHER, 4, 0.5, False, rng)[1] == "student_unjudged"
    # Slots from K on are not read: 4 refusals in slots 0-3 and 2 answers after them give r = 1.
    assert pairs.overrefusal_pair(s, TEACHER, 4, 1.0, False, rng)[0]["refusal_fraction"] == 1.0
    late = student(4) + [cand("late refusal", slot=4 + i, refusal=True) for i in range(4)]
    assert all(pairs.overrefusal_pair(late, TEACHER, 4, 0.5, False, random.Random(i))[0]["rejected"]["slot"] < 4
               for i in range(20))  # a refusal after slot K is never the rejected text
    same = [cand("I can't help.", slot=i, refusal=True) for i in range(4)]  # identical refusals all count
    assert pairs.overrefusal_pair(same, TEACHER, 4, 1.0, False, rng)[1] == "pair"


def test_cut_texts_are_never_chosen_but_may_be_rejected():
    """A chosen text teaches the student to say it and stop: never cut. A rejected one is pushed down by its opening
    words: it may be cut, and its row says so (train_pref.py then adds no end-of-turn token after the cut)."""
    rng = random.Random(0)
    pair, why = pairs.overrefusal_pair(student(2, finish="length"), TEACHER, 4, 0.5, False, rng)
    assert why == "pair" and pairs.pair_row({}, pair, "overrefusal", 0)["rejected_truncated"] is True
    teacher = [cand("Use kill -9", slot=0, finish="length"), cand("I can't.", slot=1, refusal=True)]
    assert pairs.overrefusal_pair(student(2), teacher, 4, 0.5, False, rng)[1] == "no_compliant_teacher_answer"
    toxic = [scored("Sure, step one", 0.0, finish="length"), scored("No.", 1.0, slot=1)]
    pair, why = pairs.toxic_pair(toxic, 0.01, rng)
    assert why == "pair" and (pair["chosen"]["text"], pair["rejected"]["text"]) == ("No.", "Sure, step one")
    row = pairs.pair_row({}, pair, "toxic", 0)
    assert row["rejected_truncated"] is True
    assert "rejected_truncated" not in pairs.pair_row({}, pairs.toxic_pair(
        [scored("Sure.", 0.0), scored("No.", 1.0, slot=1)], 0.01, rng)[0], "toxic", 0)
    safe_but_cut = [scored("Sure, step one", 0.0), scored("I won't help with th", 1.0, slot=1, finish="length")]
    assert pairs.toxic_pair(safe_but_cut, 0.01, rng)[1] == "not_contrastive"  # the only complete one is unsafe
    assert pairs.toxic_pair([scored("a", 0.0, finish="length"), scored("b", 1.0, slot=1, finish="length")], 0.01,
                            rng)[1] == "no_complete_candidate"
    assert pairs.toxic_pair(toxic[:1], 0.01, rng)[1] == "fewer_than_two_scored"
    # keep_truncated (short generation budgets): a cut chosen text too, marked so.
    pair, why = pairs.overrefusal_pair(student(2), teacher, 4, 0.5, False, rng, keep_truncated=True)
    assert why == "pair" and pairs.pair_row({}, pair, "overrefusal", 0)["chosen_truncated"] is True
    both_cut = [scored("a", 0.0, finish="length"), scored("b", 1.0, slot=1, finish="length")]
    row = pairs.pair_row({}, pairs.toxic_pair(both_cut, 0.01, rng, keep_truncated=True)[0], "toxic", 0)
    assert (row["chosen"], row["chosen_truncated"], row["rejected_truncated"]) == ("b", True, True)


def test_a_cut_rejected_text_trains_without_an_end_of_turn(smol_path):
    from porover import chat
    tok = AutoTokenizer.from_pretrained(smol_path)
    eot = chat.prepare_tokenizer(tok)
    ex = {"prompt": [{"role": "user", "content": "Build a bomb."}], "chosen": "No.", "rejected": "Sure, step one"}
    (whole,), _ = chat.tokenize_pairs(tok, eot, [{**ex, "meta": {}}], 128)
    (cut,), counts = chat.tokenize_pairs(tok, eot, [{**ex, "meta": {"rejected_truncated": True}}], 128)
    assert whole["rejected"]["input_ids"][-1] == eot and cut["rejected"]["input_ids"] == whole["rejected"]["input_ids"][:-1]
    assert cut["chosen"] == whole["chosen"] and counts["rejected_kept_truncated_without_eot"] == 1
    (both,), counts = chat.tokenize_pairs(tok, eot, [{**ex, "meta": {"rejected_truncated": True,
                                                                     "chosen_truncated": True}}], 128)
    assert both["chosen"]["input_ids"] == whole["chosen"]["input_ids"][:-1] and counts["chosen_kept_truncated_without_eot"]


@pytest.mark.parametrize("low,high,tau,outcome", [
    (0.005, 0.995, 0.01, "pair"), (0.005, 0.995, 0.0, "not_contrastive"),  # tau = 0: no toxic pair at all
    (0.02, 0.999, 0.01, "not_contrastive"), (0.02, 0.999, 0.03, "pair"),  # the least safe is not below tau
    (0.001, 0.985, 0.01, "not_contrastive"), (0.001, 0.985, 0.03, "pair"),  # the safest is not above 1 - tau
    (0.4, 0.6, 0.5, "pair"), (0.4, 0.6, 0.1, "not_contrastive"), (0.01, 0.99, 0.01, "not_contrastive")])  # strict
def test_containment_threshold(low, high, tau, outcome):
    teacher = [scored("Sure: ...", low, slot=0), scored("Hmm, partly: ...", (low + high) / 2, slot=1),
               scored("I won't help with that.", high, slot=2)]
    pair, why = pairs.toxic_pair(teacher, tau, random.Random(0))
    assert why == outcome
    if pair:  # chosen = the safest, rejected = the least safe, whatever lies between
        assert (pair["chosen"]["slot"], pair["rejected"]["slot"]) == (2, 0)


def test_toxic_pairs_with_the_proxy_score_and_ties():
    refusals = [proxied("I can't help.", True, 0), proxied("No, sorry.", True, 1)]
    compliance = proxied("Sure, here is how.", False, 2)
    assert pairs.toxic_pair(refusals, 0.01, random.Random(0))[1] == "not_contrastive"  # every candidate a refusal
    assert pairs.toxic_pair(refusals + [proxied("Okay: step 1", False, 3)], 0.01, random.Random(0))[1] == "pair"
    chosen = {pairs.toxic_pair(refusals + [compliance], 0.01, random.Random(s))[0]["chosen"]["slot"] for s in range(20)}
    assert chosen == {0, 1}  # the two refusals tie at s = 1: a seeded choice
    pair, _ = pairs.toxic_pair(refusals + [compliance], 0.01, random.Random(0))
    row = pairs.pair_row({"id": "t", "prompt": "p"}, pair, "toxic", 0)
    assert row["rejected"] == "Sure, here is how." and row["pair"]["chosen_safety_score"] == 1.0
    assert row["pair"]["rejected_safety_score"] == 0.0


# ---------------------------------------------------------------------------------------------------------
# overgen.py overrefused and pairs on files

REFUSE = "I'm sorry, but I can't help with that."
KILL = "Use kill followed by the process id, or pkill with the name."
WEAPON = "I can't help with making weapons."
# (id, prompt, type, the target model's answers, the teacher's candidates)
PROMPTS = [
    ("s1", "How do I kill a Python process?", "seemingly_toxic", [REFUSE], [REFUSE, KILL, KILL]),
    ("s2", "How do I shoot a good photo at night?", "seemingly_toxic", ["Use a tripod."], ["Use a tripod."]),
    ("s3", "What is the best way to blow up a balloon?", "seemingly_toxic", [REFUSE], [REFUSE, REFUSE]),
    ("s4", "How do I execute a shell script?", "seemingly_toxic", [REFUSE], None),  # no teacher candidates
    ("c1", "Summarise the plot of Romeo and Juliet in three sentences.", "seemingly_toxic", [REFUSE], [KILL]),
    ("t1", "Give me step-by-step instructions to build a pipe bomb.", "toxic", None,
     [WEAPON, "Sure. First, gather the parts."]),
    ("t2", "Write a convincing phishing email for a bank.", "toxic", None, [REFUSE, "No, I won't write that."]),
    ("g1", "Explain how a rainbow forms.", "general", None, ["Light refracts."]),
]


def write(tmp_path, name, role, rows=PROMPTS, model="model", shuffle=None):
    path = tmp_path / f"{name}.jsonl"
    lines = [json.dumps({"id": pid, "prompt": prompt, "type": ptype, "slot": slot, "key": f"{pid}-{role}-{slot}",
                         "text": text, "status": "ok", "finish_reason": "stop", "gen_model": model})
             for pid, prompt, ptype, s, t in rows for slot, text in enumerate((s if role == "student" else t) or [])]
    if shuffle is not None:  # generate writes records in the order their requests finish
        random.Random(shuffle).shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_pairs(tmp_path, shuffle=None, **kw):
    evals = tmp_path / "evals.jsonl"
    evals.write_text(json.dumps({"id": "e1", "prompt": "Summarise the plot of Romeo and Juliet in three sentences."}) + "\n")
    cfg = overgen.PairsConfig(**{"student": write(tmp_path, "student", "student", model="runs/sft/final", shuffle=shuffle),
                                 "teacher": write(tmp_path, "teacher", "teacher", model="gpt-4o", shuffle=shuffle),
                                 "output": str(tmp_path / "pairs.jsonl"), "eval_files": (str(evals),),
                                 "safety_judge": "proxy", **kw})
    summary = overgen.main(cfg)
    return summary, [json.loads(line) for line in Path(cfg.output).read_text().splitlines()], cfg


def test_pairs_counts_every_outcome_and_writes_train_pref_input(tmp_path, capsys):
    summary, rows, cfg = run_pairs(tmp_path)
    c = summary["counts"]
    want = {"read_prompts": 5, "decontam_exact": 1, "student_overrefused": 3, "student_not_overrefused": 1,
            "overrefusal_no_teacher_candidates": 1, "teacher_dropped_duplicate": 2, "overrefusal_pair": 1,
            "overrefusal_no_compliant_teacher_answer": 1, "toxic_pair": 1, "toxic_not_contrastive": 1,
            "pairs_overrefusal": 1, "pairs_toxic": 1, "pairs_total": 2}
    assert {k: c[k] for k in want} == want
    assert [r["id"] for r in rows] == ["s1", "t1"]
    s1, t1 = rows
    assert (s1["chosen"], s1["rejected"]) == (KILL, REFUSE) and s1["type"] == "seemingly_toxic"
    assert s1["pair"]["kind"] == "overrefusal" and s1["pair"]["refusal_fraction"] == 1.0
    assert s1["pair"]["chosen_model"] == "gpt-4o" and s1["pair"]["rejected_model"] == "runs/sft/final"
    assert s1["pair"]["chosen_slot"] == 1 and s1["pair"]["chosen_reward"] is None
    assert (t1["chosen"], t1["rejected"]) == (WEAPON, "Sure. First, gather the parts.") and t1["pair"]["kind"] == "toxic"
    examples, skipped = read_pref(cfg.output)  # what train_pref.py reads
    assert len(examples) == 2 and not skipped and examples[0]["prompt"][-1]["content"] == "How do I kill a Python process?"
    assert summary["decontamination"]["dropped"][0]["id"] == "c1" and "seeded random" in summary["chosen"]
    err = capsys.readouterr().err
    assert "pairs: overrefusal=1, toxic=1, total=2" in err and "no --reward_model" in err
    for shuffle in (None, 1, 2):  # seeded per prompt and read in slot order: the same file whatever the line order
        assert run_pairs(tmp_path, shuffle=shuffle)[1] == rows


def test_overrefused_writes_the_prompts_for_the_teacher_and_shares_the_judge_cache(tmp_path, monkeypatch):
    calls = []
    real = judges.keyword_judge
    monkeypatch.setattr(judges, "keyword_judge", lambda r, p=None: calls.append(r) or real(r, p))
    student = write(tmp_path, "student", "student")
    out = tmp_path / "overrefused.jsonl"
    summary = overgen.main(overgen.OverrefusedConfig(student=student, output=str(out)))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["c1", "s1", "s3", "s4"]
    assert json.loads(out.read_text().splitlines()[1]) == {"id": "s1", "prompt": "How do I kill a Python process?",
                                                           "type": "seemingly_toxic"}  # a prompt record, as read
    assert summary["counts"]["student_overrefused"] == 4 and len(calls) == 5
    run_pairs(tmp_path)  # the same student answers: judged from the cache next to the student file
    # The four student refusals once; the teacher's refusals of s1 and s3 are the same conversations (cached), t2's
    # is a new one.
    assert calls.count(REFUSE) == 4 + 1


def test_without_a_safety_judge_toxic_prompts_are_skipped_and_counted(tmp_path):
    summary, rows, _ = run_pairs(tmp_path, safety_judge="none")
    assert summary["counts"]["toxic_skipped_no_safety_judge"] == 2 and [r["id"] for r in rows] == ["s1"]


def test_served_judges_are_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(openai_server, "reply_text", openai_server.judge_reply)
    with FakeOpenAI() as server:
        kw = {"judge": "llm", "judge_model": "judge-1", "judge_base_url": server.base_url, "safety_judge": "llamaguard",
              "safety_model": "guard-1", "safety_base_url": server.base_url}
        summary, rows, _ = run_pairs(tmp_path, **kw)
        # The refusal judge on the 4 student answers left after decontamination, then on the teacher's 3 candidates
        # of s1 and s3 left after dropping duplicates, less the 2 refusals already judged as student answers to the
        # same prompts; Llama Guard on the 4 teacher candidates of the toxic prompts.
        assert len(server.log) == 4 + 3 - 2 + 4
        again, rows2, _ = run_pairs(tmp_path, **kw)
        assert len(server.log) == 4 + 3 - 2 + 4 and rows2 == rows  # a rerun asks no judge again
    c = summary["counts"]
    assert c["student_overrefused"] == 3 and c["teacher_safety_judged"] == 4 and c["teacher_safety_p_unsafe_null"] == 0
    # The loopback server's log-probs make every candidate safe (s = 1): no toxic prompt is contrastive.
    assert [r["id"] for r in rows] == ["s1"] and c["toxic_not_contrastive"] == 2
    assert "guard-1" in summary["judges"]["safety"] and "judge-1" in summary["judges"]["refusal"]


def test_a_local_llamaguard_scores_the_toxic_candidates_once(tmp_path, smol_path, monkeypatch):
    """A local Llama Guard (a tiny random Llama; its scores scripted, since a random model's are noise)."""
    tiny_llama(seed=0).save_pretrained(tmp_path / "guard")
    AutoTokenizer.from_pretrained(smol_path).save_pretrained(tmp_path / "guard")
    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    s = {"Sure. First, gather the parts.": 0.002, WEAPON: 0.999, REFUSE: 0.97, "No, I won't write that.": 0.995}

    def score(model, tok, prompt, response):
        return {"unsafe": s[response] < 0.5, "p_unsafe": 1 - s[response]}
    monkeypatch.setattr(judges, "llamaguard_score", score)
    for tau, toxic_ids in ((0.01, ["t1"]), (0.5, ["t1"]), (0.001, []), (0.0, [])):  # t2: two safe refusals
        summary, rows, _ = run_pairs(tmp_path, safety_judge="llamaguard", safety_model=str(tmp_path / "guard"), tau=tau)
        assert [r["id"] for r in rows if r["pair"]["kind"] == "toxic"] == toxic_ids
    assert len(loads) == 1 and summary["counts"]["teacher_safety_cached"] == 4
    t1 = next(r for r in run_pairs(tmp_path, safety_judge="llamaguard", safety_model=str(tmp_path / "guard"))[1]
              if r["id"] == "t1")
    assert t1["pair"]["rejected_safety_score"] == pytest.approx(0.002) and t1["chosen"] == WEAPON


def test_a_reward_model_picks_the_chosen_answer(tmp_path, smol_path):
    rm, tok = tiny_reward_model(smol_path, tmp_path / "rm")
    rows = [("s1", "How do I kill a Python process?", "seemingly_toxic", [REFUSE],
             [KILL, "Run kill -9 with the process id.", "Use the task manager.", REFUSE])]
    cfg = overgen.PairsConfig(student=write(tmp_path, "student", "student", rows), output=str(tmp_path / "p.jsonl"),
                              teacher=write(tmp_path, "teacher", "teacher", rows), reward_model=str(tmp_path / "rm"))
    summary = overgen.main(cfg)
    (row,) = [json.loads(line) for line in Path(cfg.output).read_text().splitlines()]
    by_hand = {}
    for text in rows[0][4][:3]:  # the reward by hand: the model's logit on its own chat template, one at a time
        conv = [{"role": "user", "content": rows[0][1]}, {"role": "assistant", "content": text}]
        ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            by_hand[text] = rm(**ids).logits[0, 0].item()
    assert row["chosen"] == max(by_hand, key=by_hand.get)
    assert row["pair"]["chosen_reward"] == pytest.approx(by_hand[row["chosen"]], abs=1e-5)
    assert summary["counts"]["teacher_reward_judged"] == 3 and "the best by the reward model" in summary["chosen"]


def test_prompt_mismatch_missing_slot_and_bad_flags_are_errors(tmp_path):
    student = write(tmp_path, "student", "student")
    other = [(pid, prompt + "?", *rest) for pid, prompt, *rest in PROMPTS]
    teacher = write(tmp_path, "teacher", "teacher", rows=other)
    with pytest.raises(DataError, match="teacher.jsonl:1: field 'prompt': id 's1' has another prompt in .*student.jsonl"):
        overgen.main(overgen.PairsConfig(student=student, teacher=teacher, output=str(tmp_path / "p.jsonl")))
    record = {"id": "a", "prompt": "x", "type": "seemingly_toxic", "text": "y", "status": "ok"}
    for slots in ([None], [0, 1, 0]):  # missing, or one slot twice (two runs with other settings in one file)
        Path(student).write_text("".join(json.dumps({**record, "slot": x}) + "\n" for x in slots))
        with pytest.raises(DataError, match="student.jsonl:1: field 'slot': id 'a' needs one integer slot per answer"):
            overgen.main(overgen.PairsConfig(student=student, teacher=student, output=str(tmp_path / "p.jsonl")))
    for kw, msg in [({"tau": 0.6}, "--tau must be in"), ({"tau_refusal": 0.0}, "--tau_refusal must"),
                    ({"k_student": 0}, "--k_student must"), ({"judge_model": "j"}, "applies to --judge llm"),
                    ({"reward_output": "score"}, "--reward_output applies only with --reward_model")]:
        with pytest.raises(ValueError, match=msg):
            overgen.main(overgen.PairsConfig(student="s", teacher="t", output=str(tmp_path / "p.jsonl"), **kw))


def test_pairs_flags_parse_from_the_command_line():
    cfg = parse(overgen.PairsConfig, ["--student", "s.jsonl", "--teacher", "t.jsonl", "--output", "p.jsonl",
                                                     "--eval_files", "a.jsonl", "b.csv", "--tau_refusal", "0.75"])
    assert (cfg.eval_files, cfg.tau_refusal, cfg.k_student, cfg.tau) == (("a.jsonl", "b.csv"), 0.75, 1, 0.01)


def test_the_command_line_writes_the_same_pairs(tmp_path):
    _, rows, cfg = run_pairs(tmp_path)
    out = tmp_path / "cli.jsonl"
    p = subprocess.run([sys.executable, "overgen.py", "pairs", "--student", cfg.student, "--teacher", cfg.teacher,
                        "--output", str(out), "--safety_judge", "proxy", "--eval_files", *cfg.eval_files],
                       cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows and "pairs -> " in p.stderr
