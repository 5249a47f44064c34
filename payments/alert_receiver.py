"""A local webhook receiver for alert notifications (the local stack's stand-in for Slack or a pager):
it records every POST it gets, appends it to a JSON-lines file and prints it."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_BODY = 64 * 1024


@dataclass
class AlertReceiver:
    server: ThreadingHTTPServer
    log_path: Path | None
    echo: bool
    received: list[dict[str, Any]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.time() of each entry of `received`
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/alerts"

    def record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.received.append(body)
            self.arrived.append(time.time())
            if self.log_path is not None:
                with self.log_path.open("a") as f:
                    f.write(json.dumps(body) + "\n")
        if self.echo:
            print(f"🔔 alert notification: {body.get('subject', '')} - {body.get('body', '')}", file=sys.stderr)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_alert_receiver(*, log_path: Path | None = None, echo: bool = True) -> AlertReceiver:
    receiver: AlertReceiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {"raw": raw.decode(errors="replace")}
            receiver.record(body if isinstance(body, dict) else {"value": body})
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the receiver prints what matters
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = AlertReceiver(server=server, log_path=log_path, echo=echo)
    threading.Thread(target=server.serve_forever, name="alert-receiver", daemon=True).start()
    return receiver
