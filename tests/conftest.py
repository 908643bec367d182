"""Shared fixtures: real servers on 127.0.0.1 with ephemeral ports, and workshop mode.

Workshop mode points the tests at a learner's own copy of a stage:

    pytest tests/test_stage_1.py --stage-dir stage_1=../my_stage_1
    STAGE_DIRS=stage_1=../my_stage_1 make test

The copy is imported as `stage_1` by the in-process tests and by every subprocess: the CLI
tests run `python -P -m ...` and the documented commands run with PYTHONSAFEPATH=1, because
`-m` would otherwise put the repository (their working directory) ahead of the copy on sys.path.
tests/test_workshop.py proves it.
"""

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from support import (
    Background,
    CliProcess,
    EchoServer,
    HttpOrigin,
    all_stages,
    any_ports,
    has,
    make_server,
    stages_from,
)

# Hypothesis fails a test whose examples run longer than 200 ms by default: on a loaded
# 2-core machine that is a coin toss, not a bug. Properties here are about correctness only.
settings.register_profile("no-deadlines", deadline=None)
settings.load_profile("no-deadlines")

ROOT = Path(__file__).resolve().parent.parent
# Every stage folder in the repository, numerically sorted (stage_10 after stage_9): a new stage
# joins workshop mode just by existing.
STAGES = all_stages()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stage-dir",
        action="append",
        default=[],
        metavar="STAGE=DIR",
        help="test a copy of a stage instead of the repository's, e.g. stage_1=../my_stage_1 "
        "(repeatable; also read from the STAGE_DIRS environment variable, comma-separated)",
    )
    parser.addoption(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop of the stages that have --loop (support.LADDER's 'speed' on): uvloop runs only "
        "their tests, in this process and in every subprocess (NGROK_LOOP), and skips them if uvloop is missing",
    )


def stage_overrides(config: pytest.Config) -> dict[str, Path]:
    """The --stage-dir / STAGE_DIRS choices as {stage name: directory}."""
    pairs = list(config.getoption("--stage-dir"))
    pairs += [p for p in os.environ.get("STAGE_DIRS", "").split(",") if p.strip()]
    overrides = {}
    for pair in pairs:
        name, sep, directory = pair.partition("=")
        name = name.strip()
        path = Path(directory.strip()).expanduser().resolve()
        if not sep or name not in STAGES:
            raise pytest.UsageError(f"--stage-dir wants STAGE=DIR with STAGE one of {', '.join(STAGES)}; got {pair!r}")
        if not (path / "__init__.py").is_file():
            raise pytest.UsageError(f"--stage-dir {name}: {path} is not a stage folder (no __init__.py)")
        overrides[name] = path
    return overrides


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "since(idea, until=None): run the test, which takes a `stage` argument, on the stage that brings `idea` "
        "(a key of support.LADDER) and on every later one (before the stage that brings `until`, if given)",
    )
    # Every stage is imported from one folder of symlinks put first on the path,
    # for this process and for every CLI subprocess (through PYTHONPATH).
    overrides = stage_overrides(config)
    link_dir = Path(tempfile.mkdtemp(prefix="stages-"))
    for stage in STAGES:
        (link_dir / stage).symlink_to(overrides.get(stage, ROOT / stage), target_is_directory=True)
    sys.path.insert(0, str(link_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), os.environ.get("PYTHONPATH")]))
    config.stash[OVERRIDES] = overrides
    config.stash[LINK_DIR] = link_dir
    # The loop: subprocesses of the stages with --loop read NGROK_LOOP (its `auto` would take uvloop
    # whenever it is installed); this process's tests get it from pytest-asyncio's loop factory hook.
    os.environ["NGROK_LOOP"] = config.getoption("--loop")
    if config.getoption("--loop") == "uvloop" and uvloop_factory() is not None:
        config.pluginmanager.register(UvloopTests(), "ngrok-uvloop")


def uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None where it is not installed."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


class UvloopTests:
    """With --loop uvloop: every async test runs on uvloop (a single factory adds nothing to the test ids)."""

    @staticmethod
    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]] | None:
        factory = uvloop_factory()
        return None if factory is None else {"uvloop": factory}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # --loop uvloop: only the tests of a stage that can run on it (one with --loop) are for this run.
    if config.getoption("--loop") != "uvloop":
        return
    keep = [item for item in items if has_loops(getattr(item, "callspec", None))]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
    if uvloop_factory() is None:
        skip = pytest.mark.skip(reason="--loop uvloop: uvloop is not installed here; these ran on asyncio only")
        for item in items:
            item.add_marker(skip)


def has_loops(callspec: Any) -> bool:
    """True for a test of a stage that has --loop (support.LADDER's 'speed'): its id names the stage."""
    stage = re.search(r"(?:^|-)(stage_\d+)(?:-|$)", callspec.id) if callspec is not None else None
    return stage is not None and stage[1] in STAGES and has(stage[1], "speed")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # `@pytest.mark.since("flow")` (on a test, a class or a module's pytestmark; the closest wins):
    # the test's `stage` argument takes every stage from the one that brings flow control on.
    marker = metafunc.definition.get_closest_marker("since")
    explicit = any("stage" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize"))
    if marker is not None and "stage" in metafunc.fixturenames and not explicit:
        stages = stages_from(marker.args[0])
        if until := marker.kwargs.get("until"):  # a behaviour a later idea replaces (e.g. one client per server)
            stages = tuple(stage for stage in stages if stage not in stages_from(until))
        metafunc.parametrize("stage", stages)


def pytest_unconfigure(config: pytest.Config) -> None:
    if link_dir := config.stash.get(LINK_DIR, None):
        shutil.rmtree(link_dir, ignore_errors=True)


OVERRIDES = pytest.StashKey[dict[str, Path]]()
LINK_DIR = pytest.StashKey[Path]()


def pytest_report_header(config: pytest.Config) -> list[str]:
    overrides = config.stash.get(OVERRIDES, {})
    lines = [f"workshop mode: {name} from {path}" for name, path in overrides.items()] or [
        "stages: the repository's own (use --stage-dir STAGE=DIR to test a copy)"
    ]
    return [*lines, f"event loop of the stages with --loop: {config.getoption('--loop')}"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # The NAT lab tests need root and skip without it: say plainly how they ended, so a CI log shows it.
    worst: dict[str, str] = {}
    seconds = 0.0
    for outcome in ("passed", "skipped", "failed", "error"):  # later wins: a failed teardown beats a passed call
        for report in terminalreporter.stats.get(outcome, []):
            if "natlab" in getattr(report, "keywords", {}):
                worst[report.nodeid] = outcome
                seconds += getattr(report, "duration", 0.0)
    if worst:
        counts = ", ".join(f"{list(worst.values()).count(o)} {o}" for o in dict.fromkeys(worst.values()))
        terminalreporter.write_line(f"NAT lab (real network namespaces): {counts} in {seconds:.1f}s")


@pytest.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    """A TCP server on 127.0.0.1 that echoes every byte and passes EOF back."""
    async with EchoServer() as server:
        yield server


@pytest.fixture
def http_origin() -> Iterator[HttpOrigin]:
    """A real `http.server` on 127.0.0.1: GET returns a known page, POST returns the body's SHA-256."""
    with HttpOrigin() as origin:
        yield origin


@pytest.fixture
async def cli() -> AsyncIterator[CliProcess.Factory]:
    """Start `python -m ...` subprocesses the way a learner would; all are stopped at the end."""
    started: list[CliProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> CliProcess:
        process = await CliProcess.start(*args, cwd=ROOT, env=env)
        started.append(process)
        return process

    yield start
    await asyncio.gather(*(p.stop() for p in started))


@pytest.fixture
async def start_server(stage: str) -> AsyncIterator[Callable[..., Awaitable[tuple[Any, Any]]]]:
    """Start servers of the stage under test in this process, on free ports: `await start_server(**options)`
    returns (server, ports); `control_port=` and `host=` choose where it listens, the other options go to
    support.make_server (the tests' secret from stage 11 on unless `secret=` says otherwise). All stop
    at the end of the test."""
    async with contextlib.AsyncExitStack() as running:

        async def start(control_port: int = 0, host: str = "127.0.0.1", **options: Any) -> tuple[Any, Any]:
            server = make_server(stage, **options)
            ports = await server.listen(host, control_port, *any_ports(stage)[1:])
            await running.enter_async_context(Background(server.serve()))
            return server, ports

        yield start
