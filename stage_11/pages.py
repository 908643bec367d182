"""What a public user sees when the tunnel can't reach the local app: a small HTTP error page.

A browser shown a reset connection says only "connection reset"; a 502 page that names the
cause ("no tunnel client is connected") tells its user what to fix. Users who don't speak
HTTP get a clean close instead, since an HTTP response would be garbage to them.
"""

import asyncio
import contextlib
import html
import re
from typing import TYPE_CHECKING

from .protocol import LINGER

if TYPE_CHECKING:  # only for the type checker (annotations); pages -> relay -> mux, and none imports back
    from .relay import Stream

# How long we wait for a user's first bytes to tell whether they speak HTTP. Browsers
# and curl send their request at once, so a short wait is enough.
SNIFF_TIMEOUT = 2.0
# The start of a request: "GET /path HTTP/1.1".
REQUEST_LINE = re.compile(rb"([A-Z]{3,10}) (\S{1,2000}) HTTP/\d")


def error_page(cause: str) -> bytes:
    """A complete HTTP 502 response naming `cause`, which the server closes after sending."""
    body = (
        "<!doctype html><meta charset=utf-8><title>502 Bad Gateway</title>\n"
        f"<h1>502 Bad Gateway</h1>\n<p>{html.escape(cause)}</p>\n"
        "<p><small>ngrok-- tunnel server</small></p>\n"
    ).encode()
    head = (
        "HTTP/1.1 502 Bad Gateway\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"  # the next try may well work: don't let a browser keep this page
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


async def refuse(stream: "Stream", cause: str) -> bool:
    """Answer an HTTP user with a 502 page naming `cause`; close anyone else cleanly.

    Returns True if the page was sent. The connection is closed when this returns.
    """
    transport = stream.transport
    assert transport is not None
    stream.refusing = True  # from now on, what the user sends is read and dropped
    transport.resume_reading()
    # The user's first bytes may have come already (they were on their way to the client).
    with contextlib.suppress(TimeoutError):  # silent: not an HTTP user we could answer
        async with asyncio.timeout(SNIFF_TIMEOUT):
            await stream.heard
    is_http = REQUEST_LINE.match(stream.sent.head) is not None
    if is_http and not transport.is_closing():
        transport.write(error_page(cause))
    # End our side politely and give the page time to arrive before the close: closing with
    # unread input would make the kernel send a reset, which can destroy the page.
    if not transport.is_closing() and transport.can_write_eof():
        transport.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER):
            await asyncio.shield(stream.ended)  # the user's EOF: it has read the page
    transport.close()
    return is_http
