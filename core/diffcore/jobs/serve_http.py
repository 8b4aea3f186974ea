"""The serve job's HTTP side: JSON in and out, and the limits that keep one bad client from
hurting the others.

Every answer is JSON. A request's mistake is a 4xx with ``{"error": ...}`` (and ``"path"`` when
a field is at fault, as in a job file's message); a bug is a 500 with one line, the traceback in
the server's log; the server itself keeps running either way. The limits, and why each exists:

- ``max_connections`` open at once (one thread each); one more is answered 503 at once, so a
  flood of idle connections cannot exhaust threads or memory.
- ``max_body``: a larger declared ``Content-Length`` is a 413 before any of it is read; a body
  of more than ``MAX_VALUES`` JSON values is a 413 before it is parsed (10 MB of ``[{},{},...]``
  parse into 240 MB of objects; a real request is a few dozen values and its images' text).
- ``timeout`` seconds for each read of the request line and headers, and for the whole body: a
  client that stalls gets 408 (or, before its headers end, a closed connection).
- JSON that Python parses but a job file could not hold is refused with its path: ``NaN`` and
  ``Infinity``, a float beyond the double range (``1e999``), an integer beyond 64 bits, nesting
  deeper than ``MAX_DEPTH``, a key given twice.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import attrs

from diffcore.errors import ConfigError, DiffcoreError

MAX_VALUES = 10_000     # a request has a few dozen; a list of prompts or layers, a few hundred
MAX_DEPTH = 32          # a request nests three deep (guidance[0].layers[0])
MAX_ERROR = 1_000       # characters of an error message (a message can quote the value it refuses)
LINGER_S = 2.0          # how long a refused body is read and dropped, so the client sees the answer
INT_RANGE = (-(1 << 63), (1 << 63) - 1)

# path -> (method, handler): GET handlers take nothing, POST handlers the parsed JSON body
Routes = dict[str, tuple[str, Callable[..., dict[str, Any]]]]


@attrs.frozen
class Limits:
    max_body: int           # bytes
    timeout: float          # seconds
    max_connections: int


class HTTPError(Exception):
    """An answer other than 200 that is not about a setting: the status says what went wrong."""

    def __init__(self, status: int, message: str, *, allow: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.allow, self.retry_after = status, allow, retry_after


class Handler(BaseHTTPRequestHandler):
    """Routes a request to the server's ``routes`` and turns every outcome into JSON."""

    server: JSONServer
    server_version = "diffcore"
    unread = 0      # body bytes left unread when the answer goes out early (413, 408, ...)

    def setup(self) -> None:
        self.timeout = self.server.limits.timeout    # StreamRequestHandler applies it to the socket
        super().setup()

    def __getattr__(self, name: str) -> Any:
        """``do_GET``, ``do_POST`` and any other method (PUT, HEAD, BREW): all go to ``respond``,
        which answers a method the endpoint does not take with a 405 naming it, not a 501."""
        if name.startswith("do_"):
            return lambda: self.respond(name[3:])
        raise AttributeError(name)

    def respond(self, method: str) -> None:
        headers: dict[str, str] = {}
        try:
            status, payload = 200, self.dispatch(method, urlsplit(self.path).path.rstrip("/") or "/")
        except HTTPError as exc:
            status, payload = exc.status, {"error": str(exc)}
            headers = {k: str(v) for k, v in (("Allow", exc.allow), ("Retry-After", exc.retry_after)) if v}
        except DiffcoreError as exc:    # the request's mistake: the message a job file would get
            path = getattr(exc, "path", None)
            status, payload = 400, {"error": str(exc), **({"path": path} if path else {})}
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            first = (str(exc).strip().splitlines() or [""])[0]
            status, payload = 500, {"error": f"internal error: {type(exc).__name__}" + (f": {first}" if first else "")}
        self.send_json(status, payload, headers)
        if self.unread:
            linger(self.connection, self.unread)

    def dispatch(self, method: str, path: str) -> dict[str, Any]:
        routes = self.server.routes
        if path not in routes:
            listing = ", ".join(f"{m} {p}" for p, (m, _) in routes.items())
            raise HTTPError(404, f"no endpoint {path}; this server has: {listing}")
        wanted, handler = routes[path]
        if method != wanted:
            raise HTTPError(405, f"{path} takes {wanted}, not {method}", allow=wanted)
        return handler() if wanted == "GET" else handler(self.read_json())

    def read_json(self) -> Any:
        """The body, parsed and checked; every way it can be wrong is an error naming the limit.
        The raw bytes go as soon as they are text, before parsing makes its objects: a body is in
        memory twice at most, not three times."""
        return parse_json(body_text(self.read_body()))

    def read_body(self) -> bytearray:
        limits, length = self.server.limits, self.headers.get("Content-Length")
        if length is None:
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            raise HTTPError(411, "a POST needs a Content-Length header with the body's size in bytes"
                            + (" (this server does not take chunked bodies)" if chunked else ""))
        if not length.strip().isdigit():
            raise HTTPError(400, f"the Content-Length header must be a byte count, found {length[:40]!r}")
        size = int(length)
        if size > limits.max_body:
            self.unread = size
            raise HTTPError(413, f"the body has {size} bytes; this server takes at most {limits.max_body} "
                                 f"({limits.max_body >> 20} MiB, its job.max_body_mb)")
        body, deadline = bytearray(), time.monotonic() + limits.timeout    # grows as it arrives, not as declared
        while len(body) < size:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)    # for the whole body, not each read: no trickling
                chunk = self.rfile.read1(min(size - len(body), 1 << 16))
            except TimeoutError:
                self.close_connection = True
                raise HTTPError(408, f"the body was not sent within {limits.timeout:g} seconds (job.timeout): "
                                     f"{len(body)} of the {size} bytes Content-Length declared arrived") from None
            if not chunk:
                raise HTTPError(400, f"the body ended after {len(body)} of the {size} bytes its Content-Length "
                                     "declared")
            body += chunk
        self.connection.settimeout(limits.timeout)      # for writing the answer
        return body

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, headers too long, an
        unknown method) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # the default before parsing: it would answer without a status
            self.request_version = "HTTP/1.0"
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})
        linger(self.connection, self.server.limits.max_body)    # the rest of a refused request

    def send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        text = payload.get("error", "")
        if len(text) > MAX_ERROR:   # the middle goes: the path is at the start, the expectation often at the end
            payload["error"] = f"{text[:MAX_ERROR - 200]} [{len(text) - MAX_ERROR + 100} characters] {text[-100:]}"
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            pass    # the client went away or stopped reading; nothing left to tell it


def body_text(raw: bytes | bytearray) -> str:
    """The body as text (JSON between programs is UTF-8, RFC 8259), if it is small enough to parse."""
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")     # at least the values, minus one
    if values >= MAX_VALUES:
        raise HTTPError(413, f"the body holds about {values} JSON values; this server takes at most {MAX_VALUES} "
                             "(a request needs a few dozen)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the request body is not JSON: it is not UTF-8 text ({exc})") from None


def parse_json(text: str) -> Any:
    """``text`` as JSON a job file could have held, or the error saying why not."""
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ConfigError(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise ConfigError(f"the request body is not JSON: {exc}") from None
    check_numbers(value)
    return value


def check_numbers(value: Any) -> None:
    """Refuse what TOML could not hold, with its path: floats outside the double range (JSON's
    ``1e999`` parses as infinity), integers beyond 64 bits (torch's seeds stop there), and
    nesting deeper than ``MAX_DEPTH`` (the config walk recurses)."""
    stack = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"nested deeper than {MAX_DEPTH} levels", path=path or None)
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else k, depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise ConfigError("expected a number, found one too large for a 64-bit float", path=path or None)
        elif isinstance(item, int) and not isinstance(item, bool) and not INT_RANGE[0] <= item <= INT_RANGE[1]:
            raise ConfigError(f"expected an integer that fits in 64 bits, found one of {len(str(abs(item)))} digits",
                              path=path or None)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is a mistake (TOML refuses it too), not "the last one wins"."""
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"the key {key!r} is given twice in one object")
        table[key] = value
    return table


def linger(sock: socket.socket, unread: int, seconds: float = LINGER_S) -> None:
    """Read and drop up to ``unread`` bytes for at most ``seconds`` before closing: closing with
    unread input resets the connection, and the client would lose the answer."""
    deadline = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        while unread > 0 and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(min(unread, 1 << 16))
            if not chunk:
                break
            unread -= len(chunk)
    except OSError:
        pass


class JSONServer(ThreadingHTTPServer):
    """A threading HTTP server with a cap on open connections; ``routes`` are set after binding."""

    routes: Routes
    request_queue_size = 128    # the listen backlog (5 by default): a burst waits there, not in SYN retries

    def __init__(self, host: str, port: int, limits: Limits):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.limits, self.routes = limits, {}
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        try:
            super().__init__((host, port), Handler)
        except OSError as exc:
            raise DiffcoreError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.slots.acquire(blocking=False):
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise
            return
        self.refuse(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def refuse(self, sock: socket.socket) -> None:
        """503 for a connection over the cap, written here in the accepting thread: it is short."""
        data = json.dumps({"error": f"the server is busy: {self.limits.max_connections} connections are open "
                                    "(its job.max_connections); try again shortly"}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.settimeout(0.1)
            sock.sendall(head + data)
        except OSError:
            pass
        linger(sock, self.limits.max_body, seconds=0.1)
        self.shutdown_request(sock)
