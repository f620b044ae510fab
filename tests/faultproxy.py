"""A small HTTP proxy on loopback that forwards to an S3 server and injects transient faults.

By a fixed schedule over request numbers, methods and paths (so a test is reproducible): 503
SlowDown, 500 InternalError, 301 PermanentRedirect (a bucket in another region), or a
connection dropped with no response. The client must retry with
backoff.
"""
from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate.</Message></Error>')
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b'<Message>We encountered an internal error. Please try again.</Message></Error>')
# What S3 answers a request sent to the wrong region's endpoint.
REDIRECT = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>PermanentRedirect</Code>'
            b'<Message>The bucket you are attempting to access must be addressed using the specified endpoint.'
            b'</Message></Error>')
ERRORS = {"503": (503, SLOWDOWN), "500": (500, INTERNAL), "301": (301, REDIRECT)}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection", "content-length"}


def default_schedule(n: int, method: str = "", path: str = "") -> str | None:
    """About one request in five fails; a retried request never meets two faults in a row."""
    if n % 17 == 5:
        return "reset"
    if n % 13 == 3:
        return "500"
    if n % 9 == 1:
        return "503"
    return None


class FaultProxy:
    def __init__(self, upstream: str, schedule=default_schedule):
        host, port = upstream.split("://", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.schedule = schedule
        self.lock = threading.Lock()
        self.requests = 0
        self.faults = {"503": 0, "500": 0, "reset": 0}  # the default schedule's; others counted when met
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _next_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            fault = self.schedule(self.requests, method, path)
            self.requests += 1
            if fault:
                self.faults[fault] = self.faults.get(fault, 0) + 1
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self):
                body = self._body()
                fault = proxy._next_fault(self.command, self.path)
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault:
                    return self._error(*ERRORS[fault])
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
