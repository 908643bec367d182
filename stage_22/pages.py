"""What a public user sees when the tunnel can't reach the local app: a small HTTP error page.

A browser shown a reset connection says only "connection reset"; a 502 page that names the
cause ("no tunnel client is connected") tells its user what to fix. Users who don't speak
HTTP get a clean close instead, since an HTTP response would be garbage to them. The server
also uses `request_line` to write one ngrok-style line per request in its log.
"""

import asyncio
import contextlib
import html
import re
from typing import TYPE_CHECKING

from .protocol import LINGER, printable

if TYPE_CHECKING:  # only for the type checker (annotations); pages -> relay -> mux, and none imports back
    from .relay import Stream

# How long we wait for a user's first bytes to tell whether they speak HTTP. Browsers
# and curl send their request at once, so a short wait is enough.
SNIFF_TIMEOUT = 2.0
# The start of a request ("GET /path HTTP/1.1") or of a response ("HTTP/1.1 200 OK").
REQUEST_LINE = re.compile(rb"([A-Z]{3,10}) (\S{1,2000}) HTTP/\d")
STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})")
REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def request_line(head: bytes) -> str | None:
    """'GET /path' if `head` starts like an HTTP request, else None; unprintable bytes come out escaped."""
    if match := REQUEST_LINE.match(head):
        method, path = (printable(part) for part in match.groups())
        return f"{method} {path}"
    return None


def status_code(head: bytes) -> str | None:
    """'200' if `head` starts like an HTTP response, else None; interim responses before it are skipped."""
    start = 0
    while match := STATUS_LINE.match(head, start):
        status = match[1].decode()
        if not status.startswith("1") or status == "101":  # 101: the protocol switches, that is the answer
            return status
        # An interim response (100 Continue, 103 Early Hints): the answer follows its blank line.
        end = head.find(b"\r\n\r\n", match.end())
        if end < 0:
            return None  # not within the bytes kept
        start = end + 4
    return None


def summary(up_head: bytes, down_head: bytes) -> str:
    """For the request log: 'GET /path -> 200' if the user spoke HTTP, else 'closed'.

    Tutorial shortcut: only the first request of a connection is named; a browser
    that keeps a connection open for more requests gets one line for all of them.
    """
    request = request_line(up_head)
    if request is None:
        return "closed"
    return f"{request} -> {status_code(down_head) or 'no response'}"


def error_page(status: int, cause: str, headers: str = "") -> bytes:
    """A complete HTTP response naming `cause`, which the server closes after sending; `headers`: more lines."""
    title = f"{status} {REASONS.get(status, 'Error')}"
    body = (
        f"<!doctype html><meta charset=utf-8><title>{title}</title>\n"
        f"<h1>{title}</h1>\n<p>{html.escape(cause)}</p>\n"
        "<p><small>ngrok-- tunnel server</small></p>\n"
    ).encode()
    head = (
        f"HTTP/1.1 {title}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"  # the next try may well work: don't let a browser keep this page
        f"{headers}Connection: close\r\n\r\n"
    ).encode()
    return head + body


async def refuse(stream: "Stream", status: int, cause: str, http: bool = False, page: bytes = b"") -> bool:
    """Answer an HTTP user with an error page naming `cause` (or `page`); close anyone else cleanly.

    `http`: the user is on the HTTP port, so it gets the page whatever it sent. Returns True if
    the page was sent. The connection is closed when this returns.
    """
    transport = stream.transport
    assert transport is not None
    stream.refusing = True  # from now on, what the user sends is read and dropped
    transport.resume_reading()
    # The user's first bytes may have come already (they were on their way to the client).
    if not http:
        with contextlib.suppress(TimeoutError):  # silent: not an HTTP user we could answer
            async with asyncio.timeout(SNIFF_TIMEOUT):
                await stream.heard
    is_http = http or request_line(stream.sent.head) is not None
    if is_http and not transport.is_closing():
        transport.write(page or error_page(status, cause))
    # End our side politely and give the page time to arrive before the close: closing with
    # unread input would make the kernel send a reset, which can destroy the page.
    if not transport.is_closing() and transport.can_write_eof():
        transport.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER):
            await asyncio.shield(stream.ended)  # the user's EOF: it has read the page
    transport.close()
    return is_http
