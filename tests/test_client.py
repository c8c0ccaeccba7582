"""porover.client against a real loopback HTTP server: the fault matrix, asserted from the server's own log."""
import asyncio
import time
import traceback

import pytest

from porover.client import Bucket, Client, FatalAPIError, Result
from tests.openai_server import FakeOpenAI

KEY = "sk-planted-7f3e9c1d-never-print-me"
MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def first(action):
    """A script that plays `action` on the first request and answers normally afterwards."""
    return lambda entry, server: action if entry["i"] == 0 else None


def always(action):
    return lambda entry, server: action


def client(server, **kw):
    return Client(server.base_url, **{"backoff": 0.05, "backoff_max": 1.0, "timeout": 5.0, **kw})


def gaps(log):
    return [b["t"] - a["t"] for a, b in zip(log, log[1:])]


# Waits are checked from below on the wall clock (a sleep is never shorter than asked, however loaded the machine),
# and from above only where the wrong behaviour would be seconds longer: a busy 2-core machine delays a thread.
@pytest.mark.parametrize("headers,low,high", [({"Retry-After": "1"}, 1.0, 4.0),
                                              ({"retry-after-ms": "300", "Retry-After": "5"}, 0.3, 4.0)])
def test_rate_limit_waits_as_told(headers, low, high):
    with FakeOpenAI(first({"status": 429, "headers": headers})) as server:
        res = client(server).chat_sync(MSGS, model="m", seed=5)
    assert res.status == "ok" and res.attempts == 2 and len(server.log) == 2
    assert server.log[0]["body"] == server.log[1]["body"]  # the same request again
    assert low <= gaps(server.log)[0] < high  # retry-after-ms takes precedence over Retry-After


def test_a_server_wait_is_capped_at_backoff_max():
    c = Client("http://127.0.0.1:1/v1", backoff_max=0.3)
    assert all(0.3 <= c._delay(1, 86400.0) <= 0.33 for _ in range(20))  # a day-long Retry-After stalls nothing
    assert all(0.1 <= c._delay(1, 0.1) <= 0.11 for _ in range(20))      # a shorter one is honoured, jittered up


def test_server_errors_back_off_up_to_the_limit():
    with FakeOpenAI(always({"status": 503})) as server:
        res = client(server, backoff=0.1, max_attempts=4).chat_sync(MSGS, model="m")
    assert res.status == "failed" and res.error_class == "transient" and res.attempts == 4
    assert len(server.log) == 4
    for k, gap in enumerate(gaps(server.log)):  # backoff * 2^k with jitter in [0.5, 1]: at least the lower end
        assert 0.5 * 0.1 * 2 ** k - 0.01 <= gap
    c = client(server, backoff=0.1, backoff_max=0.5)  # and at most the upper end, exactly, on the delays drawn
    for k in range(5):
        cap = min(0.5, 0.1 * 2 ** k)
        assert all(0.5 * cap <= c._delay(k + 1, None) <= cap for _ in range(20))
    script = lambda e, s: {"status": [500, 503, 502][e["i"]]} if e["i"] < 3 else None
    with FakeOpenAI(script) as server:
        res = client(server, max_attempts=4).chat_sync(MSGS, model="m")
    assert res.status == "ok" and res.attempts == 4 and len(server.log) == 4


@pytest.mark.parametrize("action", [{"sleep": 2.0}, {"drop": True}], ids=["timeout", "dropped"])
def test_timeouts_and_dropped_connections_are_retried(action):
    with FakeOpenAI(first(action)) as server:
        res = client(server, timeout=0.4).chat_sync(MSGS, model="m")
    # Two attempts: the first one's answer (after the server's 2 s) was not waited for, the timeout decided.
    assert res.status == "ok" and res.attempts == 2 and len(server.log) == 2


@pytest.mark.parametrize("action", [{"raw": "<html>502 Bad Gateway</html>", "content_type": "text/html"},
                                    {"raw": '{"id": "chatcmpl-1", "choices": [{"ind'},
                                    {"raw": '{"error": {"message": "overloaded"}}'}], ids=["html", "cut", "error"])
def test_a_200_that_is_no_completion_is_retried(action):
    """A proxy's page, JSON cut short or an error object with status 200 is the server's passing fault: retried,
    never a crash that takes the other requests down."""
    with FakeOpenAI(first(action)) as server:
        res = client(server).chat_sync(MSGS, model="m")
    assert res.status == "ok" and res.attempts == 2 and len(server.log) == 2
    with FakeOpenAI(always(action)) as server:
        res = client(server, max_attempts=2).chat_sync(MSGS, model="m")
    assert res.status == "failed" and res.error_class == "transient" and res.error.startswith("malformed response")


@pytest.mark.parametrize("action", [{"status": 401}, {"status": 403}, {"status": 404},
                                    {"status": 429, "error": {"message": "You exceeded your current quota",
                                                              "type": "insufficient_quota",
                                                              "code": "insufficient_quota"}}],
                         ids=["401", "403", "404", "quota"])
def test_fatal_errors_stop_at_once_and_never_show_the_key(action):
    with FakeOpenAI(always(action), echo_key=True) as server:
        with pytest.raises(FatalAPIError) as info:
            client(server).chat_many([{"messages": MSGS, "model": "m"}] * 3)
        time.sleep(0.3)
    assert len(server.log) <= 3 and all(e["i"] < 3 for e in server.log)  # nothing retried
    text = "".join(traceback.format_exception(info.value))
    assert KEY not in text and "[redacted]" in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_wrong_key_is_fatal_and_redacted():
    with FakeOpenAI(api_key="sk-the-right-one", echo_key=True) as server:
        with pytest.raises(FatalAPIError, match="401") as info:
            client(server).chat_sync(MSGS, model="m")
    assert len(server.log) == 1 and KEY not in str(info.value)
    assert KEY not in repr(client(server))


@pytest.mark.parametrize("status", [400, 422])
def test_bad_requests_are_permanent(status):
    with FakeOpenAI(always({"status": status, "error": {"message": "context length exceeded",
                                                        "type": "invalid_request_error"}}), echo_key=True) as server:
        res = client(server).chat_sync(MSGS, model="m")
    assert res.status == "failed" and res.error_class == "permanent" and res.attempts == 1
    assert len(server.log) == 1 and KEY not in res.error and "[redacted]" in res.error


def test_content_filter_and_refusal_are_answers():
    with FakeOpenAI(always({"finish_reason": "content_filter"})) as server:
        res = client(server).chat_sync(MSGS, model="m")
    assert res.status == "ok" and res.finish_reason == "content_filter" and res.text == "" and len(server.log) == 1
    with FakeOpenAI(always({"refusal": "I can't help with that."})) as server:
        res = client(server).chat_sync(MSGS, model="m")
    assert res.choices[0]["refusal"] == "I can't help with that." and len(server.log) == 1


def unsupported(param):
    def script(entry, server):
        if param in entry["body"]:
            return {"status": 400, "error": {"message": f"Unsupported parameter: '{param}' is not supported with "
                                                        "this model.", "type": "invalid_request_error",
                                             "param": param, "code": "unsupported_parameter"}}
    return script


def test_max_completion_tokens_is_learned_and_reasoning_models_get_it_at_once():
    with FakeOpenAI(unsupported("max_tokens")) as server:
        c = client(server)
        results = [c.chat_sync(MSGS, model="new", max_tokens=20) for _ in range(2)]
    assert [(r.status, r.attempts) for r in results] == [("ok", 2), ("ok", 1)] and len(server.log) == 3
    assert server.log[-1]["body"]["max_completion_tokens"] == 20 and "max_tokens" not in server.log[-1]["body"]
    with FakeOpenAI(unsupported("max_tokens")) as server:
        assert client(server).chat_sync(MSGS, model="o3-mini", max_tokens=20).status == "ok"
    assert len(server.log) == 1 and server.log[0]["body"]["max_completion_tokens"] == 20


def test_refused_n_and_seed_are_mapped_and_refused_temperature_is_fatal():
    script = lambda e, s: unsupported("n")(e, s) or unsupported("seed")(e, s)
    with FakeOpenAI(script) as server:
        res = client(server).chat_sync(MSGS, model="m", n=3, seed=7)
    assert res.status == "ok" and len(res.choices) == 1 and res.seed is None  # the caller fans out
    assert {"n", "seed"}.isdisjoint(server.log[-1]["body"])
    with FakeOpenAI(unsupported("temperature")) as server:
        with pytest.raises(FatalAPIError, match="temperature=0.7"):
            client(server).chat_sync(MSGS, model="m", temperature=0.7)
    assert len(server.log) == 1
    # A reasoning model refuses temperature and top_p outright: at 1, the API's default, they are simply dropped.
    script = lambda e, s: unsupported("temperature")(e, s) or unsupported("top_p")(e, s)
    with FakeOpenAI(script) as server:
        c = client(server)
        res = c.chat_sync(MSGS, model="o4-mini", temperature=1.0, top_p=1.0)
        assert res.status == "ok" and {"temperature", "top_p"}.isdisjoint(server.log[-1]["body"]) and len(server.log) == 3
        with pytest.raises(FatalAPIError, match="temperature=0.7"):  # any other value is still sent, and refused
            c.chat_sync(MSGS, model="o4-mini", temperature=0.7)


def test_logprobs_of_the_first_tokens():
    with FakeOpenAI() as server:
        res = client(server, logprob_positions=3).chat_sync(MSGS, model="judge", logprobs=5, max_tokens=4)
    body = server.log[0]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 4
    assert isinstance(res, Result) and res.usage["total_tokens"] > 0
    assert [p["token"] for p in res.logprobs] == ["\n\n", "safe", "\n"]
    assert len(res.logprobs[1]["top"]) == 5 and res.logprobs[1]["top"]["safe"] == pytest.approx(-0.1)


def test_concurrency_is_bounded_and_rpm_paces():
    with FakeOpenAI(latency=0.1) as server:
        client(server, concurrency=3).chat_many([{"messages": MSGS, "model": "m"}] * 9)
    assert server.max_in_flight == 3
    with FakeOpenAI() as server:
        t0 = time.monotonic()
        client(server, concurrency=16, rpm=600).chat_many([{"messages": MSGS, "model": "m"}] * 15)
    # 10 per second with a burst of 10: the last 5 need half a second
    assert len(server.log) == 15 and server.log[-1]["t"] - t0 >= 0.45


def test_token_bucket_keeps_the_average_rate():
    async def run():
        b = Bucket(6000)  # 100 tokens a second, burst 100
        t0 = time.monotonic()
        for _ in range(2):
            await b.take(120)  # more than the burst: waits for a full bucket and leaves a debt of 20
        return time.monotonic() - t0
    # The second take waits (100 + 20) / 100 s; refilling for each take in full would take 2.2 s or more.
    assert 1.15 <= asyncio.run(run()) < 2.2


def test_no_key_without_a_local_server_is_fatal(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("MY_KEY", KEY)
    with pytest.raises(FatalAPIError, match="OPENAI_API_KEY"):
        Client()
    assert Client(api_key_env="MY_KEY")._key == KEY
