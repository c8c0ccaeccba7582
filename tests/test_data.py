"""Input rules: an error names file, line and field; an unusable example is a counted skip."""
import json

import pytest

from porover.data import DataError, read_sft


def write(tmp_path, lines: list[bytes]):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_sft(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("bad,message", [
    (b'{"prompt": "a", "response": ', r"d\.jsonl:2: malformed JSON"),
    (b'{"prompt": "a", "completion": "b"}', r"d\.jsonl:2: missing field 'response'"),
    (b'{"messages": [{"role": "assistant", "content": "a"}]}', r"d\.jsonl:2: field 'messages' has no prompt"),
    (b'{"response": "a"}', r"d\.jsonl:2: missing field 'prompt'"),
    (b'{"prompt": 3, "response": "a"}', r"d\.jsonl:2: field 'prompt' must be str"),
    (b'{"prompt": "\xff\xfe", "response": "a"}', r"d\.jsonl:2: invalid UTF-8"),
    (b'["prompt"]', r"d\.jsonl:2: expected a JSON object"),
    (b'{"messages": [{"role": "user", "content": "a"}]}', r"d\.jsonl:2: .*must end with an assistant message"),
    (b'{"messages": [{"role": "user"}]}', r"d\.jsonl:2: field 'messages'\[0\]"),
])
def test_errors_name_file_line_field(tmp_path, bad, message):
    good = json.dumps({"prompt": "hi", "response": "hello"}).encode()
    with pytest.raises(DataError, match=message):
        read_sft(write(tmp_path, [good, bad]))


def test_formats_and_counted_skips(tmp_path):
    lines = [
        {"prompt": "hi", "response": "hello", "category": "greeting"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
        {"prompt": "hi", "response": "   "},
        {"prompt": [{"role": "user", "content": "listed"}], "response": "ok"},
    ]
    p = write(tmp_path, [json.dumps(x).encode() for x in lines] + [b""])
    examples, skipped = read_sft(p)
    assert skipped == {"empty_response": 1}
    assert [e["response"] for e in examples] == ["hello", "a", "ok"]
    assert examples[1]["prompt"] == lines[1]["messages"][:2]
    assert examples[0]["meta"]["category"] == "greeting"  # extra fields pass through


def test_demo_seed_is_valid():
    examples, skipped = read_sft("data/demo/sft_seed.jsonl")
    assert len(examples) >= 60 and not skipped
