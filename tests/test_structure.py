"""The structure lint (`python3 -m tools.imports`): no import cycle in a stage, the client never imports the server.

Tiny fake stages in a temporary folder show each rule reporting what it should; then the lint runs
over the repository's stages.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # last: workshop mode puts the stages (or a learner's copies) first
from tools import imports  # noqa: E402  (the repository root is not on the tests' path by default)


def stage(root: Path, name: str, files: dict[str, str]) -> Path:
    folder = root / name
    for path, text in {"__init__.py": "", **files}.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return folder


def lint(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tools.imports", "--root", str(root), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False)


def test_a_clean_stage_passes(tmp_path: Path) -> None:
    stage(
        tmp_path,
        "stage_8",
        {
            "protocol.py": "import asyncio\nfrom collections.abc import Iterator\n",
            "server.py": "from . import protocol\nfrom .protocol import X\n",
            "client.py": "from .protocol import X\n",
            "__main__.py": "from .client import Client\nfrom .server import Server\n",
            # The one third-party exception: used when installed, and the stage runs without it.
            "cli.py": "try:\n    import uvloop\nexcept ImportError:\n    uvloop = None\n",
        },
    )
    done = lint(tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert "no import cycle" in done.stdout


def test_a_new_module_is_placed_on_a_side(tmp_path: Path) -> None:
    stage(tmp_path, "stage_8", {"speed.py": ""})
    done = lint(tmp_path, "stage_8")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "stage_8/speed.py: speed is on no side yet: add it to SIDES in tools/imports.py "
        "(server-side, client-side or shared)"
    ]


def test_a_cycle_is_reported_with_its_path(tmp_path: Path) -> None:
    stage(
        tmp_path,
        "stage_9",
        {
            "mux.py": "from .relay import Stream\nfrom .pages import printable\n",
            "relay.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .mux import Mux\n",
            "pages.py": "def f() -> None:\n    from .relay import Stream\n",
        },
    )
    assert imports.check(tmp_path) == [
        "stage_9: import cycle mux -> pages -> relay -> mux (mux.py:2, pages.py:2, relay.py:4)",
        "stage_9: import cycle mux -> relay -> mux (mux.py:1, relay.py:4)",
    ]
    done = lint(tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 2


def test_the_client_never_imports_the_server(tmp_path: Path) -> None:
    stage(
        tmp_path,
        "stage_10",
        {
            "server.py": "",
            "client.py": "",
            "inspector.py": "from .server import listen_error\n",
            "private.py": "from . import server\n",
            "protocol.py": "from .client import Client\n",  # shared code must not import a side either
            "routing.py": "from .inspector import Inspector\n",
            "__main__.py": "from .client import Client\nfrom .server import Server\n",  # the demo runs both
        },
    )
    assert imports.check(tmp_path) == [
        "stage_10/inspector.py:1: client-side inspector imports server-side server (the client would load the server)",
        "stage_10/private.py:1: client-side private imports server-side server (the client would load the server)",
        "stage_10/protocol.py:1: shared protocol imports client-side client",
        "stage_10/routing.py:1: server-side routing imports client-side inspector",
    ]


def test_a_stage_imports_nothing_from_another_stage_and_only_the_standard_library(tmp_path: Path) -> None:
    stage(
        tmp_path,
        "stage_11",
        {
            "client.py": "import stage_3.client\nfrom stage_0.relay import relay\nfrom stage_11 import protocol\n",
            "server.py": "from ..stage_3 import server\n",
            "protocol.py": "import requests\nimport uvloop\nimport json, os.path\n",
        },
    )
    assert imports.check(tmp_path) == [
        "stage_11/client.py:1: imports another stage, stage_3: a copied stage folder must run on its own",
        "stage_11/client.py:2: imports another stage, stage_0: a copied stage folder must run on its own",
        "stage_11/client.py:3: imports its own stage by name (use a relative import): "
        "a copied stage folder must run on its own",
        "stage_11/protocol.py:1: imports requests, not in the standard library: stage code is stdlib only",
        "stage_11/protocol.py:2: imports uvloop unguarded: only inside `try:` ... `except ImportError:`",
        "stage_11/server.py:1: imports from outside its stage (..stage_3)",
    ]


def test_stages_go_in_numeric_order(tmp_path: Path) -> None:
    for name in ("stage_10", "stage_9", "stage_1"):
        stage(tmp_path, name, {})
    assert imports.stages(tmp_path) == ["stage_1", "stage_9", "stage_10"]


def test_the_repository_has_no_structure_problem() -> None:
    problems = imports.check(ROOT)
    assert not problems, "\n".join(problems)
