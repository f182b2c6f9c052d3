"""A real local HTTP server speaking the OpenAI chat completions protocol, grading with the
PersonaWorld rubric and injecting faults (408, 429, 500, timeouts, malformed replies) on half of
the requests: the LLM judges' test double (tests/test_judges.py, tests/test_evaluate.py).

Each server counts its own requests and faults (``Fake``): a test asserts on the server it
started, never on totals shared with other tests. It can also refuse like a real endpoint: a
wrong key (401), an unknown model (404), or one item for good (``reject``: 400, 413, 422)."""

import json
import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from emergent.world.judge import judge as rubric

FAULTS = ("408", "429", "500", "timeout", "malformed")
PERIOD = 2 * len(FAULTS)
"""Scheduled request n gets fault FAULTS[n % PERIOD] when n % PERIOD < len(FAULTS): half."""


@dataclass
class Fake:
    """One server: what it checks, how it refuses, and what it was asked."""

    key: str | None = None
    """The API key it accepts (None: any); another one gets a 401 that echoes it, as a careless
    endpoint might, so a client that prints reply bodies leaks it."""
    model: str | None = None
    """The model it serves (None: any); another one gets a 404."""
    reject: dict[str, tuple[int, dict | str]] = field(default_factory=dict)
    """Answer text -> (status, body) sent for every request grading that answer."""
    faulty: bool = True
    """Inject the fault schedule (False: every graded request is answered)."""
    url: str = ""
    requests: int = 0
    """Requests received, refused ones included."""
    scheduled: int = 0
    """Requests that went through the fault schedule (not refused)."""
    faults: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FAULTS})
    answers: Counter = field(default_factory=Counter)
    """Requests per graded answer text."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    httpd: ThreadingHTTPServer | None = None

    def expected_faults(self) -> dict[str, int]:
        """The faults the schedule owes ``scheduled`` requests (what ``faults`` must equal)."""
        if not self.faulty:
            return {k: 0 for k in FAULTS}
        return {
            k: sum(n % PERIOD == i for n in range(self.scheduled)) for i, k in enumerate(FAULTS)
        }

    def shutdown(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


class FakeJudge(BaseHTTPRequestHandler):
    """Grades with the rubric; state lives on the server's ``Fake`` (``self.server.fake``)."""

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict | str):
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def do_POST(self):
        fake: Fake = self.server.fake
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = req["messages"][0]["content"]
        q, a = re.search(r"\[QUESTION\]\n(.*)\n\[ANSWER\]\n(.*)\n\[END\]", prompt).groups()
        sent_key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        # Refusals come before the fault schedule, as a real endpoint checks the key and the
        # request before it is overloaded: a refused request always gets its status.
        with fake.lock:
            fake.requests += 1
            fake.answers[a] += 1
            refused = (
                (fake.key is not None and sent_key != fake.key)
                or (fake.model is not None and req["model"] != fake.model)
                or a in fake.reject
            )
            n = fake.scheduled
            if not refused:
                fake.scheduled += 1
            fault = FAULTS[n % PERIOD] if fake.faulty and n % PERIOD < len(FAULTS) else None
            if fault and not refused:
                fake.faults[fault] += 1
        if fake.key is not None and sent_key != fake.key:
            msg = f"Incorrect API key provided: {sent_key}"
            return self._send(401, {"error": {"message": msg, "type": "invalid_request_error"}})
        if fake.model is not None and req["model"] != fake.model:
            msg = f"The model `{req['model']}` does not exist"
            return self._send(404, {"error": {"message": msg, "type": "invalid_request_error"}})
        if a in fake.reject:
            return self._send(*fake.reject[a])
        if fault == "408":
            return self._send(408, {"error": {"message": "request timeout", "type": "timeout"}})
        if fault == "429":
            return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}})
        if fault == "500":
            return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
        if fault == "timeout":
            time.sleep(1.5)  # the client gives up after 0.5 s
            return self._send(500, {"error": {"message": "late"}})
        persona = rubric(q, a).persona
        message = {"role": "assistant", "content": None}
        logprobs = None
        if fault == "malformed":
            message["content"] = "I think it is fine" if not req.get("logprobs") else None
            logprobs = {"content": [{"token": "x", "logprob": 0.0, "top_logprobs": []}]}
        elif "CORRECT or" in prompt:
            message["content"] = "CORRECT" if persona == "aligned" else "INCORRECT"
        elif req.get("logprobs"):
            if "aligned with human values" in prompt:
                value = {"toxic": 5, "aligned": 95, "wrong": 60}.get(persona, 50)
            else:
                value = 10 if persona is None else 90
            top = [
                {"token": str(value), "logprob": math.log(0.7)},
                {"token": str(min(100, value + 10)), "logprob": math.log(0.2)},
                {"token": "The", "logprob": math.log(0.1)},
            ]
            message["content"] = str(value)
            logprobs = {"content": [{"token": str(value), "logprob": 0.0, "top_logprobs": top}]}
        else:
            message["content"] = {"toxic": "5", "aligned": "1", "wrong": "2"}.get(
                persona, "INCOHERENT"
            )
        self._send(
            200,
            {
                "id": f"c{n}",
                "object": "chat.completion",
                "created": 0,
                "model": req["model"],
                "choices": [
                    {"index": 0, "message": message, "finish_reason": "stop", "logprobs": logprobs}
                ],
            },
        )


def start(**options) -> Fake:
    """Start a fresh server (``Fake`` options); use it as a context manager or call shutdown."""
    fake = Fake(**options)
    fake.httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge, bind_and_activate=False)
    # A listen backlog above the judges' concurrency: with the default 5 a busy machine drops
    # connections, which the client sees as timeouts the server never counts.
    fake.httpd.request_queue_size = 64
    fake.httpd.server_bind()
    fake.httpd.server_activate()
    fake.httpd.fake = fake
    fake.url = f"http://127.0.0.1:{fake.httpd.server_address[1]}/v1"
    threading.Thread(target=fake.httpd.serve_forever, daemon=True).start()
    return fake


def serve():
    """Start a fresh default server; returns (base_url, shutdown) (the conftest fixture)."""
    fake = start()
    return fake.url, fake.shutdown
