"""The learner's check (`make check STAGE=3 DIR=../my_stage_3`, tests/check.py): what it runs, and what it says.

It must run every test that touches the named stage and no other, and tell a learner whose copy is
broken what is broken, by name, first, in a screenful; a copy that works passes and says so. The
copies here are made in a temporary folder and broken on purpose, one line each.
"""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import check
import pytest
import test_tunnel

from support import all_stages

ROOT = Path(__file__).resolve().parent.parent
SCREEN = 60  # lines: a broken copy's report must fit in this


def run_check(*args: str, timeout: float = 50) -> tuple[int, list[str]]:
    """Run `python -m tests.check ARGS` as a learner would; return its exit status and its output's lines.

    In a session of its own, so that a check that hangs is stopped with the pytest it started.
    """
    check_run = subprocess.Popen(
        [sys.executable, "-m", "tests.check", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = check_run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(check_run.pid, signal.SIGKILL)
        output, _ = check_run.communicate()
        raise AssertionError(f"python -m tests.check {' '.join(args)} ran over {timeout} s:\n{output}") from None
    return check_run.returncode, output.splitlines()


def copy_of(stage: str, tmp_path: Path, old: str = "", new: str = "", file: str = "") -> Path:
    """A copy of the repository's stage in `tmp_path`, with `old` replaced by `new` in `file` (a deliberate bug)."""
    copy = tmp_path / f"my_{stage}"
    shutil.copytree(ROOT / stage, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if file:
        source = (copy / file).read_text()
        assert source.count(old) == 1, f"{stage}/{file} changed: put this test's deliberate bug somewhere else"
        (copy / file).write_text(source.replace(old, new))
    return copy


def collected(*args: str) -> set[str]:
    """The test ids pytest collects with ARGS (nothing runs)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args, "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {line for line in done.stdout.splitlines() if "::" in line}


# --- which tests it runs --------------------------------------------------------------------------


def touches(test_id: str, stage: str) -> bool:
    """Does this test run `stage`? Its parameters name the stage, or it is in the stage's own test files.

    (Not this file's tests: they run the check, which must never run them in turn.)
    """
    file, _, rest = test_id.partition("::")
    params = re.search(r"\[(.*)\]$", rest)
    named = {part for part in params[1].split("-") if re.fullmatch(r"stage_\d+", part)} if params else set()
    own = re.fullmatch(r"tests/test_(stage_\d+)(_\w+)?\.py", file)
    if file == "tests/test_check.py":
        return False
    return stage in named if named else bool(own and own[1] == stage)


@pytest.mark.parametrize("stage", ["stage_3", "stage_13"])
def test_it_selects_every_test_that_runs_the_stage_and_no_other(stage: str) -> None:
    everything = collected()
    chosen = collected("-p", "tests.check", f"--check-stage={stage}")
    assert chosen == {test for test in everything if touches(test, stage)}
    # What the stage pages' old commands missed, and what they ran for nothing:
    assert f"tests/test_tunnel.py::test_lines_reach_the_far_end_and_come_back[{stage}]" in chosen
    assert any(t.startswith("tests/test_docs_commands.py::") and f"[{stage}-README-md-" in t for t in chosen)
    assert f"tests/test_stage_3.py::test_half_close_travels_end_to_end[{stage}]" in chosen
    others = [t for t in chosen if set(re.findall(r"\bstage_\d+\b", t.partition("[")[2])) - {stage}]
    assert not any(t.startswith("tests/test_check.py") for t in chosen)
    assert others == [], "another stage's tests"
    assert not any(t.startswith(("tests/test_docs_site.py", "tests/test_workshop.py")) for t in chosen)


def test_stage_13_is_held_to_the_rules_of_every_idea_it_holds() -> None:
    chosen = collected("-p", "tests.check", "--check-stage=stage_13")
    files = {test.partition("::")[0] for test in chosen}
    assert {"tests/test_streams.py", "tests/test_frames.py", "tests/test_stage_3.py"} <= files
    assert {"tests/test_auth.py", "tests/test_tunnel.py", "tests/test_idle_timeouts.py"} <= files
    assert "tests/test_observe.py" not in files  # a later idea's tests: not stage 13's


# --- what it says -----------------------------------------------------------------------------------


HALF_CLOSE = ("relay.py", "            dst.write_eof()\n", "            dst.close()\n")  # closes both ways at EOF
LOCAL_APP = ("client.py", "await self._connect(*self.local)", "await self._connect(self.local[0], self.local[1] + 1)")


def test_a_broken_half_close_is_named_first_and_the_tunnel_still_comes_up(tmp_path: Path) -> None:
    file, old, new = HALF_CLOSE
    copy = copy_of("stage_3", tmp_path, old, new, file)
    status, lines = run_check("3", str(copy), "-k", "half_close or lines_reach or speaks_first")
    assert status == 1
    assert len(lines) < SCREEN, "\n".join(lines)
    assert lines[0] == f"Checking stage_3 in {copy}: 3 tests of 3 behaviours, from 2 test files"
    assert lines[1].startswith("BROKEN  Half close travels end to end  [tests/test_stage_3.py]"), "\n".join(lines)
    # The tunnel's fixture comes up without half-close: the test fails by name, not in its setup.
    assert any(line.startswith("BROKEN  Lines reach the far end and come back  [") for line in lines)
    assert not any("could not start" in line or "never came up" in line for line in lines), "\n".join(lines)
    assert lines[-2].startswith(f"stage_3 in {copy}: 3 of 3 behaviours broken")
    assert lines[-1].startswith("One test in full: .venv/bin/pytest 'tests/test_stage_3.py::test_half_close")


def test_a_local_app_that_cannot_be_reached_is_named_with_its_log_and_briefly(tmp_path: Path) -> None:
    file, old, new = LOCAL_APP
    copy = copy_of("stage_3", tmp_path, old, new, file)
    status, lines = run_check("3", str(copy), "-k", "lines_reach or two_hundred or before_the_tunnel")
    assert status == 1
    assert len(lines) < SCREEN, "\n".join(lines)
    assert lines[1] == "BROKEN  Lines reach the far end and come back  [tests/test_tunnel.py]", "\n".join(lines)
    assert "BROKEN  Two hundred users at once each get only their own lines  [tests/test_tunnel.py]" in lines
    # The log says why, once for each kind of line in the whole report, however often two hundred
    # users made the client say it: "...; sent a 502 page" (to the fixture's probe) and "...; closed".
    why = [line.strip() for line in lines if "the tunnel client cannot reach 127.0.0.1:" in line]
    assert why and all(line.startswith("log: WARNING stage_3.client: conn ") for line in why), "\n".join(lines)
    assert len(why) <= 2, "\n".join(lines)


def test_the_stages_own_tests_come_before_the_docs_sessions_that_show_the_same_fault(tmp_path: Path) -> None:
    """The page's session fails too (curl gets a 502), but the test of the behaviour says more: it comes first."""
    file, old, new = LOCAL_APP
    copy = copy_of("stage_3", tmp_path, old, new, file)
    status, lines = run_check("3", str(copy), "-k", "Your-own-app or http_get")
    assert status == 1
    broken = [line for line in lines if line.startswith("BROKEN")]
    assert broken[0].startswith("BROKEN  Http get through the public port returns the local apps page  ["), lines
    assert lines[1] == broken[0]
    if len(broken) > 1:  # the documented session ran (it needs a network namespace)
        assert broken[1].startswith("BROKEN  The page's commands under 'Your own app through the tunnel' work as")


def test_tests_that_cannot_even_load_a_broken_copy_are_named_first(tmp_path: Path) -> None:
    # The idea files import the most complete stage's names (support.rebind), so a broken last stage stops them loading.
    last = all_stages()[-1]
    copy = copy_of(last, tmp_path, "HEADER_SIZE = HEADER.size", "HEADER_SIZE = HEADER.size +", "frames.py")
    status, lines = run_check(last.removeprefix("stage_"), str(copy), "-k", "lines_reach")
    assert status == 1
    assert len(lines) < SCREEN, "\n".join(lines)
    assert re.fullmatch(r"BROKEN  the tests in tests/test_\w+\.py cannot even be loaded", lines[1]), "\n".join(lines)
    assert re.match(r"    tests/test_\w+\.py:", lines[2]), "\n".join(lines)  # the line that imports the copy
    assert re.fullmatch(rf"    {re.escape(str(copy))}/frames.py:\d+: HEADER_SIZE = HEADER.size \+.*", lines[3]), lines
    assert lines[4] == "    SyntaxError: invalid syntax", "\n".join(lines)
    assert "BROKEN  the tests in tests/test_frames.py cannot even be loaded" in lines
    assert "BROKEN  the tests in tests/test_streams.py cannot even be loaded" in lines
    assert re.match(
        rf"{last} in {re.escape(str(copy))}: \d+ test files cannot be loaded, 1 of 1 behaviour broken", lines[-2]
    )


def test_a_copy_that_works_passes_and_says_so(tmp_path: Path) -> None:
    copy = copy_of("stage_3", tmp_path)
    status, lines = run_check("3", str(copy), "-k", "half_close or lines_reach or speaks_first")
    assert status == 0, "\n".join(lines)
    assert not any(line.startswith("BROKEN") for line in lines)
    assert lines[1].startswith("ok      all 2 behaviours of tests/test_stage_3.py: Stage 3 and later: the private")
    assert lines[2].startswith("ok      the one behaviour of tests/test_tunnel.py: Every tunnel stage")
    assert re.fullmatch(rf"stage_3 in {re.escape(str(copy))}: all 3 behaviours hold \(3 passed in \d+ s\)", lines[-1])


def test_all_lists_each_behaviour_that_holds() -> None:
    status, lines = run_check("3", "-k", "half_close or lines_reach or two_hundred", "--all")
    assert status == 0, "\n".join(lines)
    assert "          Two hundred users at once each get only their own lines" in lines
    assert "          Half close travels end to end" in lines


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["99", "."], "no stage '99' here: the stages are stage_0 to stage_"),  # past the last stage
        (["stage_x"], "no stage 'stage_x' here"),
        (["3", "no/such/folder"], "no/such/folder is not a folder"),
        (["3", "docs"], "docs is not a stage folder: it has no __init__.py"),
        ([], "the following arguments are required: stage"),
        (["3", "-k", "no_test_has_this_name"], "no test of stage_3 matches -k 'no_test_has_this_name'"),
    ],
)
def test_a_wrong_command_line_is_one_line_and_a_failure(args: list[str], says: str) -> None:
    status, lines = run_check(*args)
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("python -m tests.check: ") and says in lines[0], lines


# --- how it cuts a failure down ---------------------------------------------------------------------


TIMEOUT_CHAIN = """\
tests/support.py:46: in exchange
    return await reader.read()
/usr/lib/python3.11/asyncio/streams.py:711: in read
    await self._wait_for_data('read')
E   asyncio.exceptions.CancelledError

The above exception was the direct cause of the following exception:
tests/test_stage_3.py:126: in test_half_close_travels_end_to_end
    reply = await exchange(public, b"12345")
tests/support.py:45: in exchange
    async with asyncio.timeout(STEP_TIMEOUT * 3):
/usr/lib/python3.11/asyncio/timeouts.py:111: in __aexit__
    raise TimeoutError
E   TimeoutError
"""

PROGRAM_TRACEBACK = """\
tests/test_stage_3.py:180: in test_cli_demo_prints_a_public_url_that_serves_the_demo_page
    url, named, port = (await demo.expect(rf"(http://({host}):(\\d+)/)")).groups()
E   AssertionError: ('-m', 'stage_3') exited before printing 'http://':
E     08:50:08 stage_3.demo    the demo takes free ports instead
E     Traceback (most recent call last):
E       File "/tmp/stages-6xppajan/stage_3/server.py", line 91, in listen
E         addresses = [listener.sockets[0].getsockname()[:2] for listener in self._listeners]
E       File "/usr/lib/python3.11/asyncio/base_events.py", line 653, in run_until_complete
E         return future.result()
E                ^^^^^^^^^^^^^^^
E     IndexError: tuple index out of range
E
E   assert 1 == 0
"""


def test_a_chain_of_exceptions_comes_down_to_the_last_and_the_tests_lines() -> None:
    failure = check.read_failure(TIMEOUT_CHAIN, "stage_3", "../my_stage_3")
    assert failure.where == [
        'tests/test_stage_3.py:126: reply = await exchange(public, b"12345")',
        "tests/support.py:45: async with asyncio.timeout(STEP_TIMEOUT * 3):",
    ]
    assert failure.error == ["TimeoutError"]
    assert failure.headline == "TimeoutError"


def test_a_programs_traceback_comes_down_to_its_line_in_the_copy_and_its_exception() -> None:
    failure = check.read_failure(PROGRAM_TRACEBACK, "stage_3", "../my_stage_3")
    assert failure.error == [
        "AssertionError: ('-m', 'stage_3') exited before printing 'http://':",
        "../my_stage_3/server.py:91: "
        "addresses = [listener.sockets[0].getsockname()[:2] for listener in self._listeners]",
        "IndexError: tuple index out of range",
    ]
    assert failure.headline == "IndexError: tuple index out of range"


def test_a_log_says_each_kind_of_warning_once_with_how_often() -> None:
    log = "\n".join(
        [
            "INFO     stage_3.server:server.py:70 control port listening on 127.0.0.1:40001",
            *(
                f"WARNING  stage_3.client:client.py:127 conn {n:08x}: the tunnel client cannot reach "
                f"127.0.0.1:{40000 + n} (connection refused); sent a 502 page"
                for n in range(500)
            ),
            "ERROR    stage_3.server:server.py:99 conn 0badc0de: something else",
        ]
    )
    assert check.log_lines(log) == [
        "log: WARNING stage_3.client: conn 00000000: the tunnel client cannot reach 127.0.0.1:40000 "
        "(connection refused); sent a 502 page  (x500)",
        "log: ERROR stage_3.server: conn 0badc0de: something else",
    ]


FAILS_THEN_LOGS_WHY = """
import logging

import pytest

log = logging.getLogger("stage_3.client")


@pytest.fixture
def tunnel():
    yield 8000
    # As a copy's task does when the test stops it: it says why only after the user gave up.
    log.warning("conn 1234abcd: the tunnel client cannot reach 127.0.0.1:9 (connection refused)")


def test_http_get_returns_the_page(tunnel):
    assert 502 == 200


def test_a_behaviour_that_holds():
    pass
"""


def test_what_the_copy_logs_after_a_failure_is_in_the_report(tmp_path: Path) -> None:
    """The plugin's events, end to end: a test fails, its teardown logs the cause, the report shows both."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_stage_3_fake.py").write_text(FAILS_THEN_LOGS_WHY)
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [
            *(sys.executable, "-m", "pytest", "-p", "tests.check", "--check-stage=stage_3"),
            *(f"--check-events={write_end}", "-q", "--tb=short", "-p", "no:cacheprovider"),
            *("-c", str(tmp_path / "pytest.ini"), str(tmp_path)),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=[write_end],
    )
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        events = [json.loads(line) for line in pipe]
    assert child.wait(timeout=30) == 1
    run = check.Run("stage_3", "../my_stage_3")
    for event in events:
        list(run.on(event))
    lines = run.report(list_all=False)
    assert lines[:3] == [
        "BROKEN  Http get returns the page  [test_stage_3_fake.py]",
        "    assert 502 == 200",  # (its place is not shown: only tests/ and the copy are)
        "    log: WARNING stage_3.client: conn 1234abcd: the tunnel client cannot reach 127.0.0.1:9 "
        "(connection refused)",
    ], lines
    assert lines[-2].startswith("stage_3 in ../my_stage_3: 1 of 2 behaviours broken, 1 hold (1 failed, 1 passed in")


def test_a_copy_where_everything_is_broken_still_gets_a_report_that_fits_a_screen() -> None:
    """Seventy behaviours broken, each with a long traceback and a chatty log: the first in full, the rest counted."""
    run = check.Run("stage_9", "../my_stage_9")
    tests = [
        {"id": f"tests/test_stage_9.py::test_b{n}", "file": "tests/test_stage_9.py", "key": f"test_b{n}"}
        | {"name": f"Behaviour {n}", "case": "", "module": "Stage 9: one connection for everything."}
        for n in range(70)
    ]
    list(run.on({"kind": "collected", "tests": tests}))
    frames = "".join(f"tests/test_stage_9.py:{n}: in test_b\n    step_{n}()\n" for n in range(8))
    log = "\n".join(f"WARNING  stage_9.client:client.py:{n} kind {'y' * n} of warning" for n in range(10))
    for n, test in enumerate(tests):
        text = frames + "".join(f"E   AssertionError: {'x' * (n + 1)} line {line}\n" for line in range(10))
        list(
            run.on({"kind": "result", "id": test["id"], "when": "call", "outcome": "failed", "text": text, "log": log})
        )
    lines = run.report(list_all=False)
    assert len(lines) < SCREEN, "\n".join(lines)
    assert lines[0] == "BROKEN  Behaviour 0  [tests/test_stage_9.py]"
    assert any(
        re.fullmatch(r"BROKEN  and \d+ more behaviours: \d+ in tests/test_stage_9.py \(--all names each\)", x)
        for x in lines
    )
    everything = run.report(list_all=True)
    assert all(any(line.startswith(f"BROKEN  Behaviour {n}  [") for line in everything) for n in range(70))


# --- the tunnel fixture's readiness probe, which the check's output depends on ------------------------


async def test_the_readiness_probe_gives_up_after_a_few_tries_not_hundreds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tunnel that closes every user at once: the probe's tries back off, and its error says what it saw."""
    tries = 0

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal tries
        tries += 1
        writer.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    monkeypatch.setattr(test_tunnel, "STEP_TIMEOUT", 2.0)
    async with server:
        with pytest.raises(AssertionError, match=r"the tunnel never came up: \d+ users in 2 s got no answer"):
            await test_tunnel.wait_until_tunnel_works(server.sockets[0].getsockname()[1])
    assert 3 <= tries <= 12  # 20 ms apart it would be about a hundred


async def test_the_readiness_probe_takes_any_answer_and_does_not_half_close() -> None:
    """A tunnel up in front of a broken copy: it closes both ways at the user's EOF, and answers with a 502 page.

    A probe that half-closed, or that waited for its own line to come back, would call it down.
    """

    async def broken_half_close_and_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        try:
            async with asyncio.timeout(0.2):
                if await reader.read(1) == b"":  # the user's EOF: close without a word
                    writer.close()
                    return
        except TimeoutError:
            pass
        writer.write(b"HTTP/1.0 502 Bad Gateway\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(broken_half_close_and_app, "127.0.0.1", 0)
    async with server, asyncio.timeout(5):
        await test_tunnel.wait_until_tunnel_works(server.sockets[0].getsockname()[1])


# --- where the learner finds it -----------------------------------------------------------------------


@pytest.mark.parametrize("stage", check.STAGES)
def test_every_stage_page_ends_with_its_check_command(stage: str) -> None:
    page = (ROOT / stage / "README.md").read_text()
    assert f"```sh\nmake check STAGE={stage.removeprefix('stage_')} DIR=../my_{stage}\n```\n" in page


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_check_runs_the_check_on_the_named_copy() -> None:
    # Run under `make test`, a nested make would inherit its flags and print "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(
        ["make", "-n", "check", "STAGE=3", "DIR=../my_stage_3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == ".venv/bin/python -m tests.check 3 ../my_stage_3"
