"""A minimal segflow webhook receiver (Python standard library only), to copy and adapt.

It checks `X-Segflow-Signature` (HMAC-SHA256, hex, of the raw request body with the
destination's secret), drops repeats of an `X-Segflow-Delivery` key (delivery is at least
once: a retry or a replay can bring the same delivery again) and prints each transition.

    SEGFLOW_ACCOUNT_REVIEW_SECRET=change-me python3 examples/webhook_receiver.py --port 8080

Answer 2xx only once the delivery is safely handled; 5xx or 429 (with Retry-After) make the
worker retry with backoff, any other status makes it a dead letter at once.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1_000_000


def valid_signature(secret: bytes, body: bytes, signature: str) -> bool:
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    # Constant-time comparison, so the signature cannot be guessed byte by byte.
    return hmac.compare_digest(expected, signature)


def make_server(host: str, port: int, secret: bytes) -> ThreadingHTTPServer:
    # In production keep the seen keys in your database, next to what the delivery changed.
    seen: set[str] = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self.answer(413)
            body = self.rfile.read(length)
            if not valid_signature(secret, body, self.headers.get("X-Segflow-Signature", "")):
                return self.answer(401)
            key = self.headers.get("X-Segflow-Delivery", "")
            with lock:
                repeat = key in seen
                seen.add(key)
            if not repeat:
                t = json.loads(body)
                print(f"{t['kind']:5} {t['segment']} profile {t['profile_id']} "
                      f"at {t['effective_at']} context {t['context']}", flush=True)
            self.answer(204)

        def answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--secret-env", default="SEGFLOW_ACCOUNT_REVIEW_SECRET",
                        help="environment variable holding the destination's secret")
    args = parser.parse_args()
    secret = os.environ.get(args.secret_env)
    if not secret:
        parser.error(f"set {args.secret_env} to the destination's secret")
    server = make_server(args.host, args.port, secret.encode())
    print(f"listening on http://{args.host}:{args.port}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
