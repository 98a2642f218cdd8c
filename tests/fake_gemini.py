"""A small fake of the Gemini REST API on loopback, for the real ``google-genai`` client.

Each request takes the next scripted reply (a JSON body, an ``Error``, a ``Stream`` of
bodies, or ``HOLD``, which blocks until ``release()``); every request is recorded with its
model, method and JSON body.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOLD = "hold"


@dataclass
class Error:
    code: int
    status: str
    message: str = "scripted error"


@dataclass
class Delay:
    seconds: float
    body: dict[str, Any]


@dataclass
class Stream:
    chunks: list[dict[str, Any]]


@dataclass
class Received:
    model: str
    method: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def contents(self) -> list[dict[str, Any]]:
        return list(self.body.get("contents", []))


def text_reply(text: str, *, model: str = "gemini-2.5-flash", prompt_tokens: int = 11,
               output_tokens: int = 7, finish: str | None = "STOP") -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    return {"candidates": [cand], "modelVersion": model, "usageMetadata": {
        "promptTokenCount": prompt_tokens, "candidatesTokenCount": output_tokens,
        "totalTokenCount": prompt_tokens + output_tokens}}


def calls_reply(*calls: tuple[str, dict[str, Any]], model: str = "gemini-2.5-flash") -> dict[str, Any]:
    parts = [{"functionCall": {"name": n, "args": a}} for n, a in calls]
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP",
                            "index": 0}],
            "modelVersion": model,
            "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 5,
                              "totalTokenCount": 25}}


class FakeGemini:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._script: deque[Any] = deque()
        self._lock = threading.Lock()
        self._release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                owner._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeGemini:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def reply(self, *items: Any) -> None:
        with self._lock:
            self._script.extend(items)

    def release(self) -> None:
        self._release.set()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        model_method = path.rsplit("/models/", 1)[-1]
        model, _, method = model_method.partition(":")
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))) or b"{}")
        with self._lock:
            self.requests.append(Received(model, method, body, dict(h.headers.items())))
            item = self._script.popleft() if self._script else Error(500, "INTERNAL", "script empty")
        if item == HOLD:
            self._release.wait(60)
            return
        if isinstance(item, Delay):
            self._release.wait(item.seconds)
            item = item.body
        try:
            if isinstance(item, Error):
                self._send(h, item.code, {"error": {"code": item.code, "message": item.message,
                                                    "status": item.status}})
            elif isinstance(item, Stream):
                h.send_response(200)
                h.send_header("Content-Type", "text/event-stream")
                h.end_headers()
                for chunk in item.chunks:
                    h.wfile.write(f"data: {json.dumps(chunk)}\r\n\r\n".encode())
                    h.wfile.flush()
            else:
                self._send(h, 200, item)
        except (BrokenPipeError, ConnectionResetError):
            pass

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
