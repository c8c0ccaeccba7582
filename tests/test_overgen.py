"""overgen.py generate against a real loopback server: n handling, faults per item, fatal exits, SIGKILL and
resume, key hygiene, dry runs, and the local backend on the embedded model."""
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import overgen
from porover.client import FatalAPIError
from porover.data import DataError
from tests.openai_server import FakeOpenAI

KEY = "sk-planted-0b5d2a9e-must-never-be-written"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def prompts_file(tmp_path, names):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"id-{p}", "prompt": p, "category": "demo"}) + "\n" for p in names))
    return str(path)


def cfg_for(server, tmp_path, names=("p0", "p1", "p2", "p3"), **kw):
    base = dict(input=prompts_file(tmp_path, names), output=str(tmp_path / "out" / "cand.jsonl"),
                base_url=server.base_url, backoff=0.02, backoff_max=0.2, timeout=5.0)
    return overgen.GenerateConfig(**{**base, **kw})


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def user(entry):
    return entry["body"]["messages"][-1]["content"]


def per_prompt(recs):
    return Counter(r["id"] for r in recs)


def test_api_n_one_request_per_prompt_and_summary(tmp_path):
    with FakeOpenAI() as server:
        summary = overgen.main(cfg_for(server, tmp_path, n=3))
    recs = records(tmp_path / "out" / "cand.jsonl")
    assert len(server.log) == 4 and all(e["body"]["n"] == 3 for e in server.log)
    assert per_prompt(recs) == {f"id-p{i}": 3 for i in range(4)} and len({r["key"] for r in recs}) == 12
    r = recs[0]
    assert r["category"] == "demo" and r["prompt"].startswith("p") and r["status"] == "ok" and r["attempts"] == 1
    assert r["finish_reason"] == "stop" and r["usage"]["completion_tokens"] > 0 and r["model"].startswith("gpt-4o")
    assert {"refusal", "seed", "latency", "slot"} <= set(r)
    saved = json.loads((tmp_path / "out" / "cand.summary.json").read_text())
    assert saved["counts"]["ok"] == 12 and saved["cost_usd"] > 0 and saved["tokens"]["completion"] > 0
    assert saved["input_sha256"]["input"] and "git_commit" in saved and summary["counts"]["requests"] == 4
    # cost_usd is this run's; cost_usd_all_runs adds up every run on this output, and a dry run spends nothing.
    with FakeOpenAI() as server:
        dry = overgen.main(cfg_for(server, tmp_path, n=3, dry_run=True))
        more = overgen.main(cfg_for(server, tmp_path, n=4))
    assert dry["cost_usd_all_runs"] == saved["cost_usd"] and "cost_usd" not in dry
    assert more["cost_usd_all_runs"] == pytest.approx(saved["cost_usd"] + more["cost_usd"], abs=2e-6)
    assert more["tokens_all_runs"]["completion"] == saved["tokens"]["completion"] + more["tokens"]["completion"]


def test_ignored_n_is_detected_and_fanned_out(tmp_path):
    with FakeOpenAI(ignore_n=True) as server:
        summary = overgen.main(cfg_for(server, tmp_path, n=3, concurrency=1))
    recs = records(tmp_path / "out" / "cand.jsonl")
    assert per_prompt(recs) == {f"id-p{i}": 3 for i in range(4)}  # exactly n per prompt
    assert [e["body"].get("n") for e in server.log] == [3] + [None] * 11  # one try with n, then one per sample
    for p in range(4):
        assert len({r["seed"] for r in recs if r["id"] == f"id-p{p}"}) == 3  # distinct seeds
    assert summary["counts"]["n_short_responses"] == 1


def test_raising_n_reuses_the_first_slots(tmp_path):
    with FakeOpenAI() as server:
        overgen.main(cfg_for(server, tmp_path, n=2))
        before = (tmp_path / "out" / "cand.jsonl").read_text()
        overgen.main(cfg_for(server, tmp_path, n=4))
    after = (tmp_path / "out" / "cand.jsonl").read_text()
    assert after.startswith(before)  # slots 0-1 kept as they were
    assert [e["body"]["n"] for e in server.log[4:]] == [2] * 4  # only slots 2-3 requested
    assert sorted(Counter(r["slot"] for r in records(tmp_path / "out" / "cand.jsonl")).items()) == \
        [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_faults_are_recorded_per_item_and_retried_as_asked(tmp_path, capfd):
    fixed = set()

    def script(entry, server):
        p = user(entry)
        if p == "filter":
            return {"finish_reason": "content_filter"}
        if p == "bad" and "bad" not in fixed:
            return {"status": 400, "error": {"message": "maximum context length exceeded",
                                             "type": "invalid_request_error"}}
        if p == "down" and "down" not in fixed:
            return {"status": 503}

    names = ("ok", "filter", "bad", "down")
    with FakeOpenAI(script, api_key=KEY, echo_key=True) as server:
        cfg = cfg_for(server, tmp_path, names, n=2, max_attempts=2)
        overgen.main(cfg)
        asked = Counter(user(e) for e in server.log)
        assert asked == {"ok": 1, "filter": 1, "bad": 1, "down": 2}  # 503 retried up to the limit, 400 never
        recs = records(cfg.output)
        assert Counter((r["prompt"], r["status"]) for r in recs) == {("ok", "ok"): 2, ("filter", "filtered"): 2}
        errors = records(tmp_path / "out" / "cand.errors.jsonl")
        assert Counter((e["id"], e["error_class"]) for e in errors) == {("id-bad", "permanent"): 2,
                                                                        ("id-down", "transient"): 2}
        assert all("[redacted]" in e["error"] for e in errors)  # the server echoed the key
        fixed.update(["bad", "down"])
        n = len(server.log)
        summary = overgen.main(cfg)  # --retry_failed transient: the 503s again, not the 400
        assert [user(e) for e in server.log[n:]] == ["down"] and summary["counts"]["not_retried_permanent"] == 2
        summary = overgen.main(overgen.GenerateConfig(**{**vars(cfg), "retry_failed": "none"}))
        assert summary["counts"]["not_retried_permanent"] == 2 and len(server.log) == n + 1
        overgen.main(overgen.GenerateConfig(**{**vars(cfg), "retry_failed": "all"}))
        assert [user(e) for e in server.log[n + 1:]] == ["bad"]
        assert all(e["auth_ok"] for e in server.log)  # the key from the environment was sent
    assert per_prompt(records(cfg.output)) == {f"id-{p}": 2 for p in names}
    assert_key_absent(tmp_path / "out", capfd.readouterr())


def assert_key_absent(folder, *texts):
    for f in Path(folder).rglob("*"):
        assert not f.is_file() or KEY.encode() not in f.read_bytes(), f
    for t in texts:
        assert KEY not in str(t)


def cli(cfg, *extra):
    args = [sys.executable, str(ROOT / "overgen.py"), "generate"]
    for k, v in vars(cfg).items():
        if v is not None and v != getattr(overgen.GenerateConfig, k):
            args += [f"--{k}" if v is not False else f"--no-{k}"] + ([] if isinstance(v, bool) else [str(v)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args + list(extra), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("quota", [False, True], ids=["401", "insufficient_quota"])
def test_fatal_errors_exit_fast_without_further_requests(tmp_path, quota):
    quota_error = {"status": 429, "error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                            "code": "insufficient_quota"}}
    script = (lambda e, s: quota_error) if quota else None
    with FakeOpenAI(script, api_key=None if quota else "sk-another-key", echo_key=True, latency=0.05) as server:
        cfg = cfg_for(server, tmp_path, [f"p{i}" for i in range(20)], n=2, concurrency=2)
        proc = cli(cfg)
        out, err = proc.communicate(timeout=30)
        exited = time.monotonic()
        time.sleep(0.3)
    assert proc.returncode != 0 and "stopped" in err and ("401" in err or "quota" in err)
    assert exited - server.log[0]["t"] < 2.0
    assert len(server.log) <= 2  # the requests already in flight when the first answer came, no more
    errors = records(tmp_path / "out" / "cand.errors.jsonl")
    assert errors and all(e["error_class"] == "fatal" for e in errors)
    assert json.loads((tmp_path / "out" / "cand.summary.json").read_text())["fatal"]
    assert_key_absent(tmp_path / "out", out, err)


def test_sigkill_then_resume_pays_for_nothing_twice(tmp_path):
    names = [f"q{i}" for i in range(8)]
    with FakeOpenAI(latency=0.1) as server:
        (tmp_path / "ref").mkdir()
        ref = cfg_for(server, tmp_path / "ref", names, n=2, api_n=False, concurrency=2)
        overgen.main(ref)
        ref_keys = {r["key"] for r in records(ref.output)}
        assert len(ref_keys) == 16
        for k in (1, 5, 11):
            run = tmp_path / f"kill{k}"
            run.mkdir()
            cfg = cfg_for(server, run, names, n=2, api_n=False, concurrency=2)
            proc = cli(cfg)
            out = Path(cfg.output)
            while not (out.exists() and out.read_bytes().count(b"\n") >= k):
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            lines = out.read_bytes().split(b"\n")
            finished = {json.loads(line)["key"] for line in lines[:-1]}  # lines[-1]: b"" or a torn line
            assert k <= len(finished) < 16
            n = len(server.log)
            summary = overgen.main(cfg)
            assert summary["counts"]["finished_before"] == len(finished)
            recs = records(out)
            keys = [r["key"] for r in recs]
            assert len(keys) == len(set(keys)) and set(keys) == ref_keys  # same set, no duplicates
            key_of = {(r["prompt"], r["seed"]): r["key"] for r in recs}  # one request per sample (no api n)
            # A request the kill cut off mid-body can reach the server's log late, without a body: not a new call.
            again = {key_of[(user(e), e["body"]["seed"])] for e in server.log[n:] if "messages" in e["body"]}
            assert again and not again & finished  # nothing finished before the kill was asked again


def test_torn_last_line_is_truncated_and_counted(tmp_path):
    with FakeOpenAI() as server:
        cfg = cfg_for(server, tmp_path, n=2)
        overgen.main(cfg)
        out = Path(cfg.output)
        data = out.read_bytes()
        out.write_bytes(data[:len(data) - 40])  # a kill in the middle of the last record
        n = len(server.log)
        summary = overgen.main(cfg)
    assert summary["counts"]["torn_lines_truncated"] == 1 and summary["counts"]["finished_before"] == 7
    assert len(server.log) == n + 1
    assert out.read_bytes().endswith(b"\n") and per_prompt(records(out)) == {f"id-p{i}": 2 for i in range(4)}


def test_dry_run_calls_nothing_and_labels_its_estimate(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")  # no key needed to estimate
    with FakeOpenAI() as server:
        cfg = cfg_for(server, tmp_path, n=3, dry_run=True, max_new_tokens=100)
        summary = overgen.main(cfg)
    est = summary["dry_run"]
    assert not server.log and not Path(cfg.output).exists()
    assert "chars/4" in est["label"] and est["requests"] == 4 and est["completion_tokens_max"] == 1200
    assert est["prompt_tokens"] > 0 and est["cost_usd_max"] == pytest.approx(
        (est["prompt_tokens"] * 2.5 + 1200 * 10.0) / 1e6)
    price = tmp_path / "prices.json"
    price.write_text(json.dumps({"gpt-4o": [0, 1e6]}))
    est = overgen.main(overgen.GenerateConfig(**{**vars(cfg), "price_table": str(price)}))["dry_run"]
    assert est["cost_usd_max"] == 1200
    for bad in ('{"gpt-4o": [2.5, 10.0],}', '{"gpt-4o": 2.5}'):
        price.write_text(bad)
        with pytest.raises(DataError, match="prices.json: "):
            overgen.main(overgen.GenerateConfig(**{**vars(cfg), "price_table": str(price)}))


@pytest.mark.parametrize("kw,msg", [({"backend": "local", "base_url": "http://127.0.0.1:1/v1"}, "--base_url"),
                                    ({"batch_size": 4}, "--batch_size"), ({"n": 0}, "--n must"),
                                    ({"rpm": -5}, "--rpm must be positive"), ({"tpm": 0}, "--tpm must be positive"),
                                    ({"input": None}, "--input is required")])
def test_unused_or_invalid_flags_are_errors(tmp_path, kw, msg):
    cfg = overgen.GenerateConfig(**{"input": prompts_file(tmp_path, ["a"]), "output": str(tmp_path / "o.jsonl"), **kw})
    with pytest.raises(ValueError, match=msg):
        overgen.main(cfg)


@pytest.mark.parametrize("line,msg", [({"prompt": "x"}, "field 'id'"), ({"id": "a", "prompt": "y"}, "duplicate"),
                                      ({"id": "b", "prompt": "x", "text": "t"}, "field 'text' is reserved")])
def test_bad_prompt_files_name_file_line_and_field(tmp_path, line, msg):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=f"p.jsonl:2: .*{msg}"):
        overgen.main(overgen.GenerateConfig(input=str(path), output=str(tmp_path / "o.jsonl"), dry_run=True))


def test_benchmark_specs_are_inputs_too(tmp_path):
    """An OR-Bench CSV (the paper's training pool is OR-Bench-80K) or a demo split, typed and with ids."""
    csv = tmp_path / "or-bench-80k.csv"
    csv.write_text('prompt,category\n"How do I kill a stuck process?",violence\n"Best way to shoot photos at night?",'
                   'violence\n')
    with FakeOpenAI() as server:
        overgen.main(cfg_for(server, tmp_path, input=str(csv), n=1))
    recs = records(tmp_path / "out" / "cand.jsonl")
    assert [(r["id"], r["type"], r["category"]) for r in sorted(recs, key=lambda r: r["id"])] == [
        ("or-bench-80k-00001", "seemingly_toxic", "violence"), ("or-bench-80k-00002", "seemingly_toxic", "violence")]
    assert {user(e) for e in server.log} == {"How do I kill a stuck process?", "Best way to shoot photos at night?"}
    summary = overgen.main(overgen.GenerateConfig(input="demo:train", output=str(tmp_path / "d.jsonl"), dry_run=True))
    lines = sum(len((ROOT / "data/demo" / f"{t}_train.jsonl").read_text().splitlines())
                for t in ("general", "toxic", "seemingly_toxic"))
    assert summary["counts"]["prompts"] == lines  # the three train files, one prompt per line
    typed = tmp_path / "typed.jsonl"
    typed.write_text("".join(json.dumps({"id": i, "prompt": i, "type": "general"}) + "\n" for i in "ab"))
    both = f"{csv},{typed}"  # a list of specs that ends in .jsonl, not one JSONL path
    assert overgen.main(overgen.GenerateConfig(input=both, output=str(tmp_path / "b.jsonl"), dry_run=True))[
        "counts"]["prompts"] == 4


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    cfg = overgen.GenerateConfig(input=prompts_file(tmp_path, ["a"]), output=str(tmp_path / "o.jsonl"), dry_run=True)
    with open(tmp_path / "o.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another generate run"):
            overgen.main(cfg)


def test_missing_key_stops_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = overgen.GenerateConfig(input=prompts_file(tmp_path, ["a"]), output=str(tmp_path / "o.jsonl"))
    with pytest.raises(FatalAPIError, match="OPENAI_API_KEY"):
        overgen.main(cfg)
    monkeypatch.setenv("OPENAI_API_KEY", KEY + "\n")  # read from a file with its newline
    with FakeOpenAI() as server, pytest.raises(FatalAPIError, match="whitespace") as e:
        overgen.main(dataclasses.replace(cfg, base_url=server.base_url))
    assert not server.log and KEY not in str(e.value)


@pytest.fixture
def one_thread():
    """On a small shared machine OpenMP threads spinning against other processes slow generate 20-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_local_backend_gives_n_candidates_per_prompt(tmp_path, smol_path, one_thread):
    cfg = overgen.GenerateConfig(input=prompts_file(tmp_path, ["Name a colour.", "Say hello."]), backend="local",
                                 output=str(tmp_path / "local.jsonl"), model=smol_path, n=2, max_new_tokens=16,
                                 batch_size=4, system_prompt="Be brief.")
    summary = overgen.main(cfg)
    recs = records(cfg.output)
    assert per_prompt(recs) == {"id-Name a colour.": 2, "id-Say hello.": 2} and summary["counts"]["requests"] == 1
    assert {r["slot"] for r in recs} == {0, 1} and len({r["key"] for r in recs}) == 4
    assert all(r["finish_reason"] in ("stop", "length") and r["usage"]["completion_tokens"] <= 17 for r in recs)
    assert all(r["text"].strip() for r in recs) and len({r["seed"] for r in recs}) == 1  # one seeded batch
    assert overgen.main(cfg)["counts"]["todo"] == 0
    # Another chat template puts other tokens in front of the model: new keys, not the cached samples.
    assert overgen.main(dataclasses.replace(cfg, chat_template="chatml", dry_run=True))["counts"]["todo"] == 4


def test_a_prefill_starts_every_local_answer(tmp_path, smol_path, one_thread):
    """A stand-in teacher that never refuses can be made to: the answer's first words are given, the model goes on."""
    cfg = overgen.GenerateConfig(input=prompts_file(tmp_path, ["How do I pick a lock?"]), backend="local",
                                 output=str(tmp_path / "pre.jsonl"), model=smol_path, n=2, max_new_tokens=12,
                                 temperature=0.0, prefill="I'm sorry, but")
    overgen.main(cfg)
    recs = records(cfg.output)
    assert all(r["text"].startswith("I'm sorry, but") and len(r["text"]) > len("I'm sorry, but") for r in recs)
    assert recs[0]["prefill"] == "I'm sorry, but" and "prefill" not in overgen.SelectConfig.__dataclass_fields__
    # The prefill is part of what decides a sample: without it, other keys (nothing reused).
    assert overgen.main(dataclasses.replace(cfg, prefill=None, dry_run=True))["counts"]["todo"] == 2
    with pytest.raises(ValueError, match="--prefill does not apply to --backend openai"):
        overgen.main(overgen.GenerateConfig(input=cfg.input, output=str(tmp_path / "o.jsonl"), prefill="Sure"))
