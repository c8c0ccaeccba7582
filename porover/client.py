"""One client for every OpenAI-compatible chat endpoint (OpenAI, Azure OpenAI, vLLM, TGI, Ollama, llama.cpp
server), with the project's only retry layer. Training code never imports this module.

Built on AsyncOpenAI rather than OpenAI in threads: a request waiting on the network costs a task, not a
thread, so hundreds can be in flight from one core; backoff sleeps hold nothing; and a fatal error cancels
every in-flight request at once, so a bad key stops the run within a second instead of after the slowest
pending request.

The SDK's own retries are off (`max_retries=0`) so that attempts are counted and bounded in one place:
  transient, retried with backoff: 408, 409, 429 rate limits, 5xx, timeouts, dropped connections;
  fatal, FatalAPIError stops the run: 401, 403, 404, 429 `insufficient_quota`, a parameter the model refuses;
  permanent, recorded per item: 400, 422 and any other 4xx.
The API key is read from the environment here and only here. Every error text we produce is scrubbed of
it, and SDK exceptions are never chained or re-raised: their request objects carry the Authorization header.
"""
import asyncio
import email.utils
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import openai

TRANSIENT_STATUS = {408, 409, 429}  # and every 5xx
FATAL_STATUS = {401, 403, 404}
# OpenAI's reasoning models take max_completion_tokens; for any other model the server's own
# "unsupported_parameter" answer teaches us at run time (see Client._adapt).
COMPLETION_TOKENS_PREFIXES = ("o1", "o3", "o4", "gpt-5")
TOKEN_PARAMS = ("max_tokens", "max_completion_tokens")


class FatalAPIError(RuntimeError):
    """No retry can fix it (bad key, no access, unknown model, no quota, a refused parameter): stop the run."""


@dataclass
class Result:
    """One chat request's outcome after all retries."""
    status: str  # "ok" or "failed"
    choices: list[dict] = field(default_factory=list)  # {"text", "finish_reason", "refusal", "logprobs"}
    usage: dict | None = None  # the server's token counts for the whole request (all n choices)
    model: str | None = None  # the model name the server reports
    seed: int | None = None  # the seed actually sent (None when none was, or the server refuses seeds)
    error: str | None = None  # key-free error text
    error_class: str | None = None  # "transient" (retries exhausted) or "permanent"
    attempts: int = 0
    latency: float = 0.0  # seconds from the first send to the final answer, backoff included

    @property
    def text(self) -> str | None:
        return self.choices[0]["text"] if self.choices else None

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0]["finish_reason"] if self.choices else None

    @property
    def logprobs(self) -> list[dict] | None:
        return self.choices[0]["logprobs"] if self.choices else None


def endpoint_host(base_url: str | None) -> str:
    base_url = base_url or os.environ.get("OPENAI_BASE_URL")  # where the SDK sends requests when none is given
    return urlparse(base_url).netloc if base_url else "api.openai.com"


def retry_after(headers) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, else `Retry-After` (seconds or an HTTP date)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name)) * scale)
        except (TypeError, ValueError):
            pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(headers.get("retry-after")).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def classify(e: openai.APIError) -> str:
    """'transient', 'fatal' or 'permanent' for one SDK error (the module docstring's table)."""
    if not isinstance(e, openai.APIStatusError):
        return "transient"  # timeouts and dropped connections (APIConnectionError), or an unreadable 200
    if e.status_code == 429 and "insufficient_quota" in (e.code, e.type):
        return "fatal"  # a rate limit passes; an empty account does not
    if e.status_code in FATAL_STATUS:
        return "fatal"
    return "transient" if e.status_code in TRANSIENT_STATUS or e.status_code >= 500 else "permanent"


class Bucket:
    """Token bucket for requests- or tokens-per-minute: refills continuously, bursts at most one second's
    worth (providers enforce per-minute limits over shorter windows too). A take larger than the burst
    waits for a full bucket and leaves it in debt, so the average rate still holds."""

    def __init__(self, per_minute: float):
        self.rate, self.cap = per_minute / 60, max(1.0, per_minute / 60)
        self.level, self.t, self.lock = self.cap, time.monotonic(), asyncio.Lock()

    def refill(self):
        now = time.monotonic()
        self.level, self.t = min(self.cap, self.level + (now - self.t) * self.rate), now

    async def take(self, amount: float):
        async with self.lock:  # first come, first served
            self.refill()
            while self.level < min(amount, self.cap):
                await asyncio.sleep((min(amount, self.cap) - self.level) / self.rate)
                self.refill()
            self.level -= amount


def estimate_tokens(messages: list[dict]) -> int:
    """Prompt tokens by the chars/4 heuristic (English text; used for TPM pacing and --dry_run only)."""
    return sum(len(m.get("content") or "") for m in messages) // 4 + 4 * len(messages)


async def gather_cancelling(aws):
    """asyncio.gather that cancels the rest as soon as one raises, and waits until they have stopped."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Client:
    """Chat completions with bounded concurrency, optional RPM/TPM limits and our retry layer.

    Async use: `async with client: result = await client.chat(messages, model=...)`.
    Blocking use (judges): `client.chat_sync(messages, model=..., logprobs=5)` or `client.chat_many(requests)`.
    """

    def __init__(self, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 16,
                 rpm: float | None = None, tpm: float | None = None, timeout: float = 120.0, max_attempts: int = 6,
                 backoff: float = 1.0, backoff_max: float = 60.0, logprob_positions: int = 8):
        self._key = os.environ.get(api_key_env) or None
        if self._key is None and base_url is None:
            raise FatalAPIError(f"no API key: set the environment variable {api_key_env} (keys are never flags)")
        if self._key and any(ch.isspace() for ch in self._key):
            # a key read from a file keeps its newline; the SDK then fails every request as a dropped connection
            raise FatalAPIError(f"the API key in {api_key_env} contains whitespace (a trailing newline?)")
        self.base_url, self.host = base_url, endpoint_host(base_url)
        self.concurrency, self.rpm, self.tpm, self.timeout = concurrency, rpm, tpm, timeout
        self.max_attempts, self.backoff, self.backoff_max = max_attempts, backoff, backoff_max
        self.logprob_positions = logprob_positions
        self.token_param: dict[str, str] = {}  # model -> the max-tokens parameter it was found to take
        self.refused: set[tuple[str, str]] = set()  # (model, param) the server refused; mapped, not sent
        self.stats = Counter()  # requests sent and retries by cause, for summaries

    def __repr__(self):
        return f"Client(host={self.host!r}, concurrency={self.concurrency}, rpm={self.rpm}, tpm={self.tpm})"

    def redact(self, text) -> str:
        return str(text).replace(self._key, "[redacted]") if self._key else str(text)

    async def __aenter__(self):
        # Local servers (vLLM, Ollama, llama.cpp) take any key; the SDK insists on one.
        self._sdk = openai.AsyncOpenAI(api_key=self._key or "none", base_url=self.base_url, max_retries=0,
                                       timeout=self.timeout)
        self._sem = asyncio.Semaphore(self.concurrency)
        self._rpm = Bucket(self.rpm) if self.rpm else None
        self._tpm = Bucket(self.tpm) if self.tpm else None
        self._paused_until = 0.0  # a 429's Retry-After holds back every request, not only the one that got it
        return self

    async def __aexit__(self, *exc):
        await self._sdk.close()

    def params(self, messages, model, max_tokens, temperature, top_p, n, seed, logprobs) -> dict:
        p = {"model": model, "messages": messages}
        if max_tokens is not None:
            default = "max_completion_tokens" if model.startswith(COMPLETION_TOKENS_PREFIXES) else "max_tokens"
            p[self.token_param.get(model, default)] = max_tokens
        for name, value in (("temperature", temperature), ("top_p", top_p), ("n", n if n != 1 else None),
                            ("seed", seed)):
            # A refused temperature or top_p is dropped only at 1, the API's default (see _adapt).
            if value is not None and not ((model, name) in self.refused and (name in ("n", "seed") or value == 1)):
                p[name] = value
        if logprobs:
            p["logprobs"], p["top_logprobs"] = True, logprobs
        return p

    def _adapt(self, e: openai.APIError, p: dict) -> bool:
        """A 400 naming a parameter the model refuses: map it and return True (send again), or refuse clearly.

        max_tokens <-> max_completion_tokens is a rename; `n` falls back to one choice per request (callers
        verify the count and fan out); `seed` is dropped (it is best-effort anyway, and the record says so), and so
        are temperature and top_p at 1, the API's defaults (reasoning models refuse both, whatever the value).
        Anything else (temperature, top_p, logprobs) would change what is sampled: a FatalAPIError.
        """
        param = getattr(e, "param", None)
        if not (isinstance(e, openai.BadRequestError) and param in p and
                (e.code in ("unsupported_parameter", "unsupported_value") or "unsupported" in e.message.lower())):
            return False
        model = p["model"]
        if param in TOKEN_PARAMS:
            self.token_param[model] = TOKEN_PARAMS[1 - TOKEN_PARAMS.index(param)]
        elif param in ("n", "seed") or (param in ("temperature", "top_p") and p[param] == 1):
            self.refused.add((model, param))
            print(f"{self.host} refuses `{param}` for {model}: "
                  + ("one completion per request from now on" if param == "n" else f"sending no {param} from now on"),
                  file=sys.stderr)
        else:
            raise FatalAPIError(f"{self.host} refuses {param}={p[param]!r} for {model} ({self.redact(e.message)}); "
                                f"rerun with a value the model accepts or without that option")
        return True

    async def _admit(self, est_tokens: int):
        while (wait := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        if self._rpm:
            await self._rpm.take(1)
        if self._tpm:
            await self._tpm.take(est_tokens)

    def _delay(self, attempt: int, server_wait: float | None) -> float:
        """The server's wait when it names one, else exponential backoff; both with jitter (upwards only for
        the server's wait, which is a minimum) so that clients that failed together do not retry together.
        The server's wait is capped at --backoff_max: a day-long Retry-After would stall every request."""
        if server_wait is not None:
            return min(server_wait, self.backoff_max) * random.uniform(1.0, 1.1)
        return min(self.backoff_max, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    async def chat(self, messages: list[dict], *, model: str, max_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None, n: int = 1,
                   seed: int | None = None, logprobs: int | None = None) -> Result:
        """One chat completion with retries. `logprobs=k`: the top-k log-probs at each of the first
        `logprob_positions` tokens of every choice. Returns a Result (status "ok" or "failed");
        raises FatalAPIError for what must stop the run."""
        t0, attempt = time.monotonic(), 0
        while True:
            p = self.params(messages, model, max_tokens, temperature, top_p, n, seed, logprobs)
            est = estimate_tokens(messages) + (max_tokens or 0) * n
            attempt += 1
            failure = None  # (kind, status, text, server_wait, label) of a failed attempt
            try:
                async with self._sem:
                    await self._admit(est)
                    self.stats["requests"] += 1
                    resp = await self._sdk.chat.completions.create(**p)
            except openai.APIError as e:
                kind = classify(e)
                status = getattr(e, "status_code", None)
                text = self.redact(f"{type(e).__name__}" + (f" {status}" if status else "") + f": {e.message}")
                if kind == "permanent" and attempt < self.max_attempts and self._adapt(e, p):
                    continue  # send again with the parameter mapped
                if kind == "fatal":
                    raise FatalAPIError(f"{self.host}: {text}") from None
                failure = (kind, status, text, retry_after(e.response.headers) if status else None,
                           status or type(e).__name__)
            except json.JSONDecodeError as e:
                resp = f"JSON cut short ({e})"
            if failure is None:
                choices = getattr(resp, "choices", None)
                if isinstance(choices, list) and all(getattr(c, "message", None) is not None for c in choices):
                    usage = resp.usage.model_dump(exclude_none=True) if resp.usage else None
                    if self._tpm and usage:  # settle the estimate against what the server counted
                        self._tpm.level += est - usage.get("total_tokens", est)
                    return Result("ok", [self._choice(c) for c in sorted(choices, key=lambda c: c.index)], usage,
                                  resp.model, p.get("seed"), attempts=attempt, latency=time.monotonic() - t0)
                # A 200 that is no chat completion (a proxy's HTML page, JSON cut short, an error object): the
                # server's fault and usually passing, so retried like a dropped connection.
                failure = ("transient", None, self.redact(f"malformed response: {str(resp)[:200]}"), None,
                           "malformed_response")
            kind, status, text, server_wait, label = failure
            if kind == "permanent" or attempt >= self.max_attempts:
                return Result("failed", seed=p.get("seed"), error=text, error_class=kind, attempts=attempt,
                              latency=time.monotonic() - t0)
            self.stats[f"retry_{label}"] += 1
            wait = self._delay(attempt, server_wait)
            if status == 429:
                self._paused_until = max(self._paused_until, time.monotonic() + wait)
            await asyncio.sleep(wait)

    def _choice(self, c) -> dict:
        lp = None
        if c.logprobs is not None and c.logprobs.content is not None:
            lp = [{"token": t.token, "logprob": t.logprob, "top": {a.token: a.logprob for a in t.top_logprobs}}
                  for t in c.logprobs.content[:self.logprob_positions]]
        return {"text": c.message.content or "", "finish_reason": c.finish_reason,
                "refusal": getattr(c.message, "refusal", None), "logprobs": lp}

    def chat_many(self, requests: list[dict]) -> list[Result]:
        """Blocking: `chat(**r)` for every request, concurrently within the limits; results in request order."""
        async def run():
            async with self:
                return await gather_cancelling(self.chat(**r) for r in requests)
        return asyncio.run(run())

    def chat_sync(self, messages: list[dict], **kwargs) -> Result:
        """Blocking: one chat completion (e.g. a judge call with `logprobs=5`)."""
        return self.chat_many([{"messages": messages, **kwargs}])[0]
