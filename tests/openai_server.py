"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions protocol, scripted per request.

Tests start it in a thread (`with FakeOpenAI(script) as server:`) and assert from `server.log`, the
server's own record of what arrived and when. The benchmark runs it as a separate process:
    python tests/openai_server.py --latency 1.0      # prints "port N", then serves until killed

`script(entry, server)` returns None (answer normally) or a dict of what to do with this request:
    {"status": 429, "error": {...}, "headers": {...}}   an error response
    {"sleep": s}                                         answer normally after s seconds (a timeout)
    {"drop": True}                                       close the connection without answering
    {"finish_reason": "content_filter"}                  answer with this finish reason and empty text
    {"refusal": "..."}                                   answer with the API's refusal field set
    {"choices": k}                                       answer with only k choices (a server ignoring n)
    {"raw": "...", "content_type": "text/html"}          a 200 with this body (a proxy's page, cut JSON)
"""
import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reply_text(body, choice):
    """A deterministic completion that names its prompt, seed and choice, so tests can trace it."""
    user = body["messages"][-1]["content"]
    return f"answer to {user!r} seed={body.get('seed')} choice={choice}"


def judge_reply(body, choice):
    """A reply_text for judge tests: as Llama Guard (a user/assistant pair) it flags answers that start with
    "Sure"; as the LLM refusal judge it calls an answer with "can't" a full refusal."""
    last = body["messages"][-1]["content"]
    if body["messages"][-1]["role"] == "assistant":
        return "\n\nunsafe\nS9" if last.startswith("Sure") else "safe"
    response = last.split("[ASSISTANT RESPONSE]\n", 1)[1].split("\n\nClasses:", 1)[0]
    return "The assistant declines.\nverdict: full_refusal" if "can't" in response else "verdict: compliance"


class FakeOpenAI:
    def __init__(self, script=None, latency=0.0, ignore_n=False, api_key=None, echo_key=False):
        self.script, self.latency, self.ignore_n = script, latency, ignore_n
        self.api_key, self.echo_key = api_key, echo_key  # echo_key: error texts repeat the key received
        self.log, self.lock = [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):
                pass

            def do_POST(self):
                arrived = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                with server.lock:
                    entry = {"i": len(server.log), "t": arrived, "path": self.path, "body": body,
                             "auth_ok": server.api_key is None or given == server.api_key}
                    server.log.append(entry)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.handle(self, entry, given)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    self.close_connection = True
                finally:
                    entry["done"] = time.monotonic()
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 256  # the default backlog of 5 drops connections at concurrency 64
        self.httpd.server_bind()
        self.httpd.server_activate()
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def handle(self, h, entry, given):
        if not entry["auth_ok"]:
            shown = given if self.echo_key else given[:3] + "..."
            return self.send(h, 401, {"error": {"message": f"Incorrect API key provided: {shown}",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}})
        action = (self.script(entry, self) if self.script else None) or {}
        entry["action"] = action
        if "status" in action:
            error = dict(action.get("error") or {"message": f"scripted {action['status']}", "type": "error"})
            if self.echo_key:
                error["message"] += f" (key {given})"
            return self.send(h, action["status"], {"error": error}, action.get("headers", {}))
        if action.get("drop"):
            h.close_connection = True
            return
        if "raw" in action:
            return self.send(h, 200, action["raw"], content_type=action.get("content_type", "application/json"))
        time.sleep(action.get("sleep", self.latency))
        body = entry["body"]
        if "max_tokens" in body and "max_completion_tokens" in body:
            return self.send(h, 400, {"error": {"message": "give max_tokens or max_completion_tokens, not both",
                                                "type": "invalid_request_error", "code": None}})
        n = 1 if self.ignore_n else body.get("n", 1)
        n = action.get("choices", n)
        choices = []
        for j in range(n):
            text = "" if "finish_reason" in action or "refusal" in action else reply_text(body, j)
            msg = {"role": "assistant", "content": text or None, "refusal": action.get("refusal")}
            choice = {"index": j, "message": msg, "finish_reason": action.get("finish_reason", "stop")}
            if body.get("logprobs"):
                k = body.get("top_logprobs", 1)
                choice["logprobs"] = {"content": [
                    {"token": t, "logprob": -0.1 * p, "bytes": None,
                     "top_logprobs": [{"token": f"{t}{r}" if r else t, "logprob": -0.1 * p - r, "bytes": None}
                                      for r in range(k)]}
                    for p, t in enumerate(["\n\n", "safe", "\n", "S1", "x", "y", "z", "w", "v", "u"])]}
            choices.append(choice)
        prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4 + 1
        completion_tokens = sum(len(c["message"]["content"] or "") // 4 + 1 for c in choices)
        self.send(h, 200, {"id": f"chatcmpl-{entry['i']}", "object": "chat.completion", "created": int(time.time()),
                           "model": body.get("model", "fake") + "-2024-01-01", "choices": choices,
                           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens}})

    @staticmethod
    def send(h, status, obj, headers=None, content_type="application/json"):
        data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="a loopback OpenAI-compatible server for benchmarks")
    p.add_argument("--latency", type=float, default=1.0)
    args = p.parse_args()
    server = FakeOpenAI(latency=args.latency)
    print(f"port {server.port}", flush=True)
    server.httpd.serve_forever()
