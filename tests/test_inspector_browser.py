"""The inspector page in Chromium: no other site may frame it (stage 18 on); live rows, a detail, replay (18 on).

The tunnel runs as a learner runs it (`python -m stage_22.server --cert .. --key ..`,
`python -m stage_22.client .. --ca .. --name shop`: the test certificates of tls_certs.py), the
requests come from curl to `http://shop.localhost:PORT/` (curl resolves *.localhost to loopback by
itself), and headless Chromium (the docs tests' browser, which may not leave
127.0.0.1) shows the page. Playwright's sync API can't run inside an asyncio test: this module is
synchronous, and the programs are plain subprocesses.
"""

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_docs_site import BROWSER_ARGS, CHROMIUM

from support import HttpServer, rebind, server_port_flags, tls_flags
from tls_certs import certs

STAGE = "stage_22"  # the stage under test, set by `names`
pytestmark = pytest.mark.since("inspector")


@pytest.fixture(autouse=True)
def names(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This module's stage names (imported from stage_22, the most complete) are the stage under test's."""
    rebind(globals(), stage, monkeypatch)
    monkeypatch.setitem(globals(), "STAGE", stage)


ROOT = Path(__file__).resolve().parent.parent
# The stage page's picture: a run rewrites it only when asked (UPDATE_SCREENSHOTS=1), so that
# running the tests never changes a file of the repository.
SCREENSHOT = ROOT / "docs" / "assets" / "stage-19-inspector.png"
SECRET = "stage-19-browser-secret"
XSS_PATH = "/<script>alert(1)</script>"
XSS_HEADER = "<img src=x onerror=alert(2)>"
NAME = "shop"  # the tunnel's name: its users ask for shop.localhost


class _App(http.server.BaseHTTPRequestHandler):
    """A small local app: a JSON API, a page, a 404."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/api/users"):
            body = json.dumps({"users": [{"id": 1, "name": "Ada"}, {"id": 2, "name": "Linus"}], "total": 2}).encode()
            self._reply(200, "application/json", body)
        elif self.path == "/":
            self._reply(200, "text/html; charset=utf-8", b"<!doctype html><h1>Hello from the local app</h1>\n")
        else:
            self._reply(404, "text/plain", b"not found\n")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._reply(201, "application/json", json.dumps({"created": json.loads(body or b"{}")}).encode())

    def _reply(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Program:
    """A `python -m` subprocess whose output goes to a file we poll for its listening lines."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "NGROK_SECRET": SECRET}
        with self.log.open("wb") as out:
            # -P: import the stage from PYTHONPATH (conftest's folder of links), as the CLI tests do.
            self.popen = subprocess.Popen(
                [sys.executable, "-u", "-P", *args], cwd=ROOT, env=env, stdout=out, stderr=out
            )

    def port(self, role: str) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if match := re.search(rf"{role} port listening on \S+:(\d+)", self.log.read_text()):
                return int(match[1])
            assert self.popen.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {role} port: {self.log.read_text()}")

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)


@pytest.fixture
def tunnel(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The public port and the inspector's port of the stage's tunnel in front of _App."""
    app = HttpServer(("127.0.0.1", 0), _App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    args = ("-m", f"{STAGE}.server", *server_port_flags(STAGE), *tls_flags(STAGE))
    server = Program(tmp_path, "server", *args)
    programs = [server]
    try:
        control, public = server.port("control"), server.port("public")
        local = f"127.0.0.1:{app.server_address[1]}"
        # Any port for the inspector: the default 4040 may be taken on a shared machine.
        args = ("-m", f"{STAGE}.client", local, "127.0.0.1", "--control-port", str(control), "--inspect-port", "0")
        client = Program(tmp_path, "client", *args, "--ca", str(certs().ca), "--name", NAME)
        programs.append(client)
        yield public, client.port("inspector")
    finally:
        for program in reversed(programs):
            program.stop()
        app.shutdown()
        app.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"needs Chromium at {CHROMIUM} (Debian package `chromium`)")
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the `playwright` package (test extra)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def curl(public: int, path: str, *args: str) -> None:
    url = f"http://{NAME}.localhost:{public}{path}"  # the Host header names the tunnel
    subprocess.run(["curl", "-s", "-o", "/dev/null", *args, url], check=True, timeout=10)


@pytest.mark.since("live")
def test_the_page_shows_requests_live_opens_one_replays_it_and_shows_traffic_as_text(
    tunnel: tuple[int, int], browser: Any, tmp_path: Path
) -> None:
    public, inspector = tunnel
    # bypass_csp: the page's policy forbids eval, which Playwright's waits use. It also means that
    # escaping alone must keep the hostile path and header inert here: the policy is a second wall.
    context = browser.new_context(viewport={"width": 1600, "height": 860}, color_scheme="light", bypass_csp=True)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    response = page.goto(f"http://127.0.0.1:{inspector}/", wait_until="load")
    assert "script-src 'sha256-" in response.headers["content-security-policy"]  # only its own script runs
    page.wait_for_selector("#live.on")  # the event feed is open
    assert page.locator("#rows tr").count() == 0

    # Requests made now appear without a reload: the feed pushes them.
    curl(public, "/")
    curl(public, "/api/users?page=1")
    curl(public, "/missing")
    curl(public, "/api/users", "-X", "POST", "-H", "Content-Type: application/json", "-d", '{"name": "Grace"}')
    curl(public, XSS_PATH, "-H", f"X-Evil: {XSS_HEADER}")
    page.wait_for_function("document.querySelectorAll('#rows tr').length === 5")
    paths = page.locator("#rows tr td.path").all_text_contents()
    assert paths == [XSS_PATH, "/api/users", "/missing", "/api/users?page=1", "/"]  # newest first
    assert page.locator("#rows tr").nth(2).locator("td").nth(3).text_content() == "404"

    # The hostile path and header are text: no element made from them, no script run.
    page.locator("#rows tr").first.click()
    page.wait_for_selector("#detail h2")
    assert page.locator("#detail h2").text_content() == f"GET {XSS_PATH}"
    assert XSS_HEADER in page.locator("#detail table.fields").first.text_content()
    assert page.locator("#rows script, #rows img, #detail script, #detail img").count() == 0

    # The filter narrows by path, or by status.
    page.fill("#filter", "404")
    assert page.locator("#rows tr:visible td.path").all_text_contents() == [XSS_PATH, "/missing"]
    page.fill("#filter", "users")
    assert len(page.locator("#rows tr:visible").all()) == 2
    page.fill("#filter", "")

    # Open the JSON request; replay it; the new response shows beside the old one.
    page.locator("#rows tr").nth(3).click()
    page.wait_for_function("document.querySelector('#detail h2')?.textContent === 'GET /api/users?page=1'")
    assert '"name": "Ada"' in page.locator("#detail pre.body").last.text_content()  # JSON, pretty-printed
    page.click("#detail button")
    page.wait_for_selector("#detail .pair > section:nth-child(2)")
    replayed = page.locator("#detail .pair > section").nth(1)
    assert re.match(r"Replay #6: 200", replayed.locator("h3").text_content() or "")
    assert '"name": "Linus"' in replayed.locator("pre.body").text_content()
    page.wait_for_function("document.querySelectorAll('#rows tr').length === 6")  # the replay is listed too
    page.locator("#rows tr").nth(4).click()  # back to the replayed one, for the picture: replay it again
    page.wait_for_function("document.querySelector('#detail h2')?.textContent === 'GET /api/users?page=1'")
    page.click("#detail button")
    page.wait_for_selector("#detail .pair > section:nth-child(2)")
    page.wait_for_function("document.querySelectorAll('#rows tr').length === 7")
    picture = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path / SCREENSHOT.name
    page.screenshot(path=str(picture))
    assert picture.stat().st_size > 10_000  # a real picture of the page, not an empty one
    context.close()
    assert not dialogs, dialogs
    assert not errors, errors


def test_another_site_cannot_show_the_page_in_a_frame(tunnel: tuple[int, int], browser: Any) -> None:
    """Clickjacking, as an attacker's page does it: frame the inspector, hide it under its own buttons.

    The attacker's page is another origin (another port: the test browser may not leave 127.0.0.1),
    as any web site is; the browser must refuse to show the inspector inside it (X-Frame-Options and
    CSP frame-ancestors).
    """
    _, inspector = tunnel
    framing = f'<!doctype html><title>win a prize</title><iframe src="http://127.0.0.1:{inspector}/"></iframe>'

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = framing.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    context = browser.new_context()
    try:
        page = context.new_page()
        framed: list[int] = []  # the inspector's answer did reach the frame: only the browser can refuse it
        page.on("response", lambda r: framed.append(r.status) if r.url.endswith(f":{inspector}/") else None)
        page.goto(f"http://127.0.0.1:{site.server_address[1]}/", wait_until="load")
        [frame] = [f for f in page.frames if f is not page.main_frame]
        assert framed == [200]
        assert "ngrok-- inspector" not in frame.content()  # an error page stands where the inspector would be
    finally:
        context.close()
        site.shutdown()
        site.server_close()
