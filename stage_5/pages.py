"""What a user sees when the local app is down: a 502 page that says so, from the client.

A browser shown a closed connection says only "the connection was reset"; a page that names
the cause ("connection refused at localhost:8000") tells its user what is wrong. The client
writes it into the user's stream, so the server relays it like any answer: the server
needs no change for it. Users who don't speak HTTP get a clean close instead, since an HTTP
response would be garbage to them.
"""

import asyncio
import html
import re

from .protocol import Reader, Writer, linger

# How long we wait for a user's first bytes to tell whether they speak HTTP. Browsers
# and curl send their request at once, so a short wait is enough.
SNIFF_TIMEOUT = 2.0
# The start of an HTTP request: "GET /path HTTP/1.1".
REQUEST_LINE = re.compile(rb"[A-Z]{3,10} \S{1,2000} HTTP/\d")


def error_page(cause: str) -> bytes:
    """A complete HTTP 502 response naming `cause`; the connection is closed after it."""
    body = (
        "<!doctype html><meta charset=utf-8><title>502 Bad Gateway</title>\n"
        f"<h1>502 Bad Gateway</h1>\n<p>{html.escape(cause)}</p>\n"
        "<p><small>ngrok-- tunnel</small></p>\n"
    ).encode()
    head = (
        "HTTP/1.1 502 Bad Gateway\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"  # the next try may well work: don't let a browser keep this page
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


async def refuse(reader: Reader, writer: Writer, cause: str) -> bool:
    """Answer an HTTP user with a 502 page naming `cause`; close anyone else cleanly.

    Returns True if the page was sent. The caller closes `writer` afterwards.
    """
    try:
        async with asyncio.timeout(SNIFF_TIMEOUT):
            head = await reader.read(4096)
    except (TimeoutError, OSError):
        head = b""  # silent or gone: not an HTTP user we could answer
    is_http = REQUEST_LINE.match(head) is not None
    if is_http:
        writer.write(error_page(cause))
    # End our side politely and give the page time to arrive before the close.
    await linger(reader, writer)
    return is_http
