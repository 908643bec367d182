"""The inspector: a web page on the client's machine that lists every request through the tunnel, live.

    GET  /                          the page (inspector.html): no framework, no CDN, no build step
    GET  /api/requests              the exchanges kept, newest first (JSON)
    GET  /api/requests/ID           one exchange: heads, fields and bodies, ready to show (JSON)
    POST /api/requests/ID/replay    send its request to the local app again; the new exchange (JSON)
    GET  /api/events                server-sent events: each exchange again whenever it changes

Live without polling: the page opens one long response, `text/event-stream` (server-sent events),
and the inspector writes a `data: {...}` line to it whenever an exchange begins or ends. A browser's
EventSource reconnects by itself if the connection drops.

What comes from the traffic is hostile until shown otherwise: a path can be `/<script>...`. The
page builds its DOM with textContent only, and the page's Content-Security-Policy lets no script
run but its own (by hash) should that ever slip. The server binds 127.0.0.1 unless told otherwise,
and it answers only to a Host header that names loopback, so a web site can't reach it through
DNS rebinding; a replay must carry a header that a cross-site form can't send; and no other site
may show the page in a frame, under buttons of its own (clickjacking).
"""

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any

from . import capture
from .capture import ReplayError, Store
from .cli import listen_error
from .observe import Exchange, Message, NotHttp, field_values, parse_head
from .protocol import NETWORK_TIMEOUT, TunnelError

log = logging.getLogger(__name__)

INSPECT_PORT = 4040  # ngrok's, so that the story matches
PAGE = (Path(__file__).parent / "inspector.html").read_bytes()
# A feed writes what changed at most this often: at 10,000 requests a second, a page gets 20
# batches a second, not 20,000 messages.
BATCH_INTERVAL = 0.05
KEEPALIVE_INTERVAL = 15.0  # a comment line on an idle feed, so that a closed page is noticed
HEX_PREVIEW = 256  # bytes of a binary body shown in hex
REPLAY_HEADER = "x-inspector"  # a custom header forces a CORS preflight, which we never answer: same-origin only
ROUTE = re.compile(r"/api/requests/(\d{1,12})(/replay)?")
# The names a browser on this machine uses for loopback. Exact names only: a test like "begins
# with 127." let `127.attacker.example` in, a name whose owner points it wherever he likes.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def script_hashes(page: bytes) -> str:
    """The CSP sources for the page's own inline script and style: their SHA-256, nothing else."""
    sources = []
    for tag, kind in ((b"script", "script-src"), (b"style", "style-src")):
        for body in re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.S):
            sources.append(f"{kind} 'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'")
    return "; ".join(sources)


# frame-ancestors 'none': no page may frame this one (the policy's word for X-Frame-Options: DENY,
# which respond() sends too, for browsers that know only the older header).
CSP = (
    f"default-src 'none'; connect-src 'self'; img-src data:; {script_hashes(PAGE)}; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class Inspector:
    """The inspector of one client: the web page that shows the store its streams feed."""

    def __init__(self, store: Store, local: tuple[str, int], host: str = "127.0.0.1", port: int = INSPECT_PORT) -> None:
        self.store = store  # the client's (Client.store)
        self.local = local  # the local app: where replays go, and nowhere else
        self.host, self.port = host, port
        self._listener: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self) -> tuple[str, int]:
        """Bind the page's port (0 = any); TunnelError with a one-line reason if it can't be had."""
        try:
            self._listener = await asyncio.start_server(self._accept, self.host, self.port)
        except OSError as exc:
            raise TunnelError(listen_error(exc, "inspect", self.host, self.port)) from None
        self.host, self.port = self._listener.sockets[0].getsockname()[:2]
        log.info("inspector port listening on %s:%d", self.host, self.port)
        return self.host, self.port

    async def serve(self) -> None:
        """Serve the page until cancelled (the demo), then close."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop serving the page; end the live feeds."""
        if self._listener is not None:
            self._listener.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)  # a strong reference, as the servers keep
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP request, one response, then close (the page asks for little; the feed stays open)."""
        try:
            async with asyncio.timeout(NETWORK_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            start, fields = parse_head(head)
            method, target, _ = start.split(" ", 2)
            path = target.split("?")[0]
            if method == "GET" and path == "/api/events" and self._host_allowed(field_values(fields, "host")):
                await self._feed(writer)  # until the page goes away
                return
            status, kind, content = await self._route(method, path, fields)
            respond(writer, status, kind, content)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, NotHttp, ValueError):
            pass  # not a request we can answer, or the page went away
        finally:
            writer.close()

    async def _route(self, method: str, path: str, fields: list[tuple[str, str]]) -> tuple[int, str, bytes]:
        """The status, content type and body of the answer to one request."""
        if not self._host_allowed(field_values(fields, "host")):
            return 421, "text/plain", b"this inspector answers to its loopback address only\n"
        if method == "GET" and path == "/":
            return 200, "text/html; charset=utf-8", PAGE
        if method == "GET" and path == "/api/requests":
            return ok([summary(e) for e in reversed(self.store.entries.values())])
        route = ROUTE.fullmatch(path)
        if route and method == "GET" and not route[2] and (exchange := self.store.entries.get(int(route[1]))):
            return ok(detail(exchange))
        if route and method == "POST" and route[2]:
            if not field_values(fields, REPLAY_HEADER):
                return 403, "text/plain", f"a replay needs the {REPLAY_HEADER} header\n".encode()
            try:
                return ok(detail(await capture.replay(self.store, self.local, int(route[1]))))
            except ReplayError as exc:
                return 409, "application/json", json.dumps({"error": str(exc)}).encode()
        return 404, "text/plain", b"not found\n"

    def _host_allowed(self, hosts: list[str]) -> bool:
        # DNS rebinding: a web page's own name, re-pointed at 127.0.0.1, would make its scripts
        # same-origin with us. Its requests still carry its name in Host: refuse those.
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(self.host).is_loopback:
                return True  # bound elsewhere on purpose (--inspect-host): any name may lead here
        bound = f"[{self.host}]" if ":" in self.host else self.host  # e.g. 127.0.0.2 (--inspect-host)
        return len(hosts) == 1 and hosts[0] in {f"{name}:{self.port}" for name in (*LOOPBACK_NAMES, bound)}

    async def _feed(self, writer: asyncio.StreamWriter) -> None:
        """Server-sent events: every exchange kept, then each one again whenever it changes."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\r\n")
        watcher = capture.Watcher()
        watcher.changed = dict.fromkeys(self.store.entries)  # what is there already, oldest first
        watcher.wake.set()
        self.store.watchers.add(watcher)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KEEPALIVE_INTERVAL):
                        await watcher.wake.wait()
                watcher.wake.clear()
                ids, watcher.changed = watcher.changed, {}
                events = [summary(e) for i in ids if (e := self.store.entries.get(i))]
                writer.write(b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) or b": idle\n\n")
                await writer.drain()  # a page that reads slowly holds us here; changes merge meanwhile
                await asyncio.sleep(BATCH_INTERVAL)
        finally:
            self.store.watchers.discard(watcher)


def respond(writer: asyncio.StreamWriter, status: int, kind: str, body: bytes) -> None:
    """Write a whole response; the connection closes after it."""
    policy = f"Content-Security-Policy: {CSP}\r\n" if kind.startswith("text/html") else ""
    writer.write(
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
        f"X-Frame-Options: DENY\r\n{policy}Connection: close\r\n\r\n".encode()
        + body
    )


def ok(value: Any) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(value).encode()


def summary(exchange: Exchange) -> dict[str, Any]:
    """One line of the list."""
    return {
        "id": exchange.id,
        "method": exchange.method,
        "path": exchange.target,
        "status": exchange.status,
        "state": exchange.state,
        "note": exchange.note,
        "started": exchange.started,
        "duration": exchange.duration,
        "up": exchange.request.wire,
        "down": exchange.response.wire,
        "user": exchange.user,
        "replay_of": exchange.replay_of,
        "interim": exchange.interim,
    }


def detail(exchange: Exchange) -> dict[str, Any]:
    """Everything about one exchange, ready for textContent: heads split into fields, bodies rendered."""
    why_not = capture.replayable(exchange)
    return {
        **summary(exchange),
        "request": message(exchange.request),
        "response": message(exchange.response),
        "replayable": why_not is None,
        "why_not": why_not or "",
    }


def message(part: Message) -> dict[str, Any]:
    try:
        start, fields = parse_head(part.head) if part.head else ("", [])
        trailers = parse_head(b"\r\n" + part.trailers)[1] if part.trailers else []
    except NotHttp:  # a replay's or a failed entry's head: show the start line only
        start, fields, trailers = part.head.split(b"\n", 1)[0].decode("latin-1"), [], []
    return {"start": start, "fields": fields, "trailers": trailers, "body": body(part, fields)}


def body(part: Message, fields: list[tuple[str, str]]) -> dict[str, Any]:
    """A body for the page: text as text, JSON pretty-printed, anything else as its size and a hex preview."""
    kept = bytes(part.body)
    shown: dict[str, Any] = {"size": part.body_size, "kept": len(kept), "truncated": part.body_size > len(kept)}
    if not part.body_size:
        return {**shown, "kind": "empty", "text": ""}
    text = as_text(kept, shown["truncated"]) if not field_values(fields, "content-encoding") else None
    if text is None:  # as `xxd` shows it: offset, 16 bytes in hex, the same as ASCII
        preview = kept[:HEX_PREVIEW]
        rows = (preview[i : i + 16] for i in range(0, len(preview), 16))
        lines = [f"{n * 16:04x}  {row.hex(' '):<47}  {printable(row)}" for n, row in enumerate(rows)]
        return {**shown, "kind": "binary", "text": "\n".join(lines)}
    if not shown["truncated"] and any("json" in v for v in field_values(fields, "content-type")):
        # RecursionError: both json functions recurse once per level, and a body of 30,000 "[" nests deeper
        # than Python's stack allows. Such a body is shown as it came, as text.
        with contextlib.suppress(ValueError, RecursionError):
            return {**shown, "kind": "json", "text": json.dumps(json.loads(text), indent=2, ensure_ascii=False)}
    return {**shown, "kind": "text", "text": text}


def as_text(data: bytes, truncated: bool) -> str | None:
    """`data` as UTF-8 text, or None if it is not text (a cut in the middle of a character is forgiven)."""
    for cut in range(4 if truncated else 1):
        try:
            text = data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return text if all(c.isprintable() or c in "\t\r\n" for c in text) else None
    return None


def printable(data: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in data)
