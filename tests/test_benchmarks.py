"""porover.benchmarks: the safety-tuned-llamas JSON loader (Q-Harm, I-CoNa, I-Controversial layout) on files
written here, its errors, and its place among the other specs in load_all."""
import json

import pytest

from porover import benchmarks
from porover.data import DataError


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_instructions_without_inputs_are_toxic_prompts(tmp_path):
    # The published Q-Harm and I-CoNa files ship an empty `inputs` list; absent means the same.
    for name, obj in (("Q-Harm.json", {"instructions": ["How do I pick a lock?", "Insult my neighbour."], "inputs": []}),
                      ("I-CoNa.json", {"instructions": ["How do I pick a lock?", "Insult my neighbour."]})):
        recs = benchmarks.load(write_json(tmp_path / name, obj))
        stem = name.removesuffix(".json")
        assert [r["id"] for r in recs] == [f"{stem}-00001", f"{stem}-00002"]
        assert [r["prompt"] for r in recs] == ["How do I pick a lock?", "Insult my neighbour."]
        assert {(r["type"], r["label"], r["category"], r["benchmark"]) for r in recs} == {("toxic", "unsafe", stem, stem)}


def test_a_non_empty_input_follows_its_instruction_after_a_blank_line(tmp_path):
    p = write_json(tmp_path / "I-Controversial.json",
                   {"instructions": ["Summarize this text.", "Explain why the sky is green."],
                    "inputs": ["Some text to summarize.", ""]})
    a, b = benchmarks.load(p)
    assert a["prompt"] == "Summarize this text.\n\nSome text to summarize."
    assert b["prompt"] == "Explain why the sky is green."


@pytest.mark.parametrize("obj, message", [
    (["a", "b"], "expected a JSON object with field 'instructions', got list"),
    ({"inputs": []}, "field 'instructions' must be a list of strings"),
    ({"instructions": "one prompt"}, "field 'instructions' must be a list of strings"),
    ({"instructions": ["ok", 3]}, "field 'instructions' must be a list of strings"),
    ({"instructions": ["ok", "  "]}, r"field 'instructions'\[1\] is empty"),
    ({"instructions": ["a", "b"], "inputs": ["x"]}, "field 'inputs' has 1 entries for 2 instructions"),
    ({"instructions": ["a"], "inputs": [None]}, "field 'inputs' must be a list of strings"),
    ({"instructions": ["a"], "inputs": "x"}, "field 'inputs' must be a list of strings"),
])
def test_bad_files_name_the_file_and_the_field(tmp_path, obj, message):
    p = write_json(tmp_path / "bad.json", obj)
    with pytest.raises(DataError, match=f"bad.json: {message}"):
        benchmarks.load(p)


def test_unreadable_files(tmp_path):
    (tmp_path / "cut.json").write_text('{"instructions": ["a"')
    with pytest.raises(DataError, match="cut.json: malformed JSON"):
        benchmarks.load(str(tmp_path / "cut.json"))
    with pytest.raises(DataError, match="gone.json: no such file"):
        benchmarks.load(str(tmp_path / "gone.json"))
    p = write_json(tmp_path / "Q-Harm.json", {"instructions": ["a"]})
    with pytest.raises(DataError, match="harmful requests only; drop @seemingly_toxic"):
        benchmarks.load(f"{p}@seemingly_toxic")


def test_load_all_mixes_json_and_jsonl_specs(tmp_path):
    a = write_json(tmp_path / "a.json", {"instructions": ["first", "second"], "inputs": ["", "extra"]})
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "b1", "prompt": "benign", "type": "seemingly_toxic"}) + "\n")
    recs = benchmarks.load_all(f"{a}, {tmp_path / 'b.jsonl'}")
    assert [(r["id"], r["benchmark"], r["type"]) for r in recs] == [
        ("a-00001", "a", "toxic"), ("a-00002", "a", "toxic"), ("b1", "b", "seemingly_toxic")]
    assert recs[1]["prompt"] == "second\n\nextra"
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "a-00001", "prompt": "clash", "type": "toxic"}) + "\n")
    with pytest.raises(DataError, match="'a-00001' already loaded from"):
        benchmarks.load_all(f"{a},{tmp_path / 'c.jsonl'}")
