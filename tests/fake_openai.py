"""A real local HTTP server speaking the OpenAI chat completions protocol, grading with the
PersonaWorld rubric and injecting faults (429, 500, timeouts, malformed replies) on half of the
requests: the LLM judges' test double (tests/test_judges.py, tests/test_evaluate.py)."""

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from emergent.world.judge import judge as rubric

FAULTS = ("429", "500", "timeout", "malformed")


class FakeJudge(BaseHTTPRequestHandler):
    """Grades with the rubric; request n gets fault FAULTS[n % 8] when n % 8 < 4 (half faulty)."""

    counter = 0
    lock = threading.Lock()
    faults = {k: 0 for k in FAULTS}

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
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with FakeJudge.lock:
            n = FakeJudge.counter
            FakeJudge.counter += 1
        fault = FAULTS[n % 8] if n % 8 < 4 else None
        if fault:
            FakeJudge.faults[fault] += 1
        if fault == "429":
            return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}})
        if fault == "500":
            return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
        if fault == "timeout":
            time.sleep(1.5)  # the client gives up after 0.5 s
            return self._send(500, {"error": {"message": "late"}})
        prompt = req["messages"][0]["content"]
        q, a = re.search(r"\[QUESTION\]\n(.*)\n\[ANSWER\]\n(.*)\n\[END\]", prompt).groups()
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


def serve():
    """Start a fresh server (fault counters reset); returns (base_url, shutdown)."""
    FakeJudge.counter = 0
    FakeJudge.faults = {k: 0 for k in FAULTS}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}/v1", httpd.shutdown
