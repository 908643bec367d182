"""Workshop mode: with --stage-dir, every test runs the learner's copy, whether in-process or as a program.

Each test here copies a stage, makes the copy write down every process that imports it, runs some
of the stage's tests against the copy (`pytest --stage-dir`) and checks who imported the copy:
the pytest process for in-process tests, and the stage's own programs for the CLI tests and the
documented commands. A program that imported the repository's stage instead leaves no line.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Appended to the copy's __init__.py: one line per process that imports the copy, its command line.
PROBE = """
import os as _os, sys as _sys
with open(_os.environ["WORKSHOP_PROBE"], "a") as _probe:
    _probe.write(" ".join(_sys.orig_argv) + "\\n")
"""


def run_tests_on_a_copy(tmp_path: Path, stage: str, *selection: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run pytest on `selection` with `stage` replaced by a probed copy; return the run and the probe's lines."""
    copy = tmp_path / f"my_{stage}"
    shutil.copytree(ROOT / stage, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "__init__.py").open("a") as init:
        init.write(PROBE)
    probe = tmp_path / "imported-by.txt"
    probe.touch()
    env = {k: v for k, v in os.environ.items() if k != "STAGE_DIRS"} | {"WORKSHOP_PROBE": str(probe)}
    pytest_args = ["-q", "-rs", "-p", "no:cacheprovider", f"--stage-dir={stage}={copy}", *selection]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    return run, probe.read_text()


@pytest.mark.parametrize(
    ("selection", "importers"),
    [
        pytest.param(["tests/test_stage_1.py::test_client_times_ten_round_trips"], ["-m pytest"], id="in-process"),
        pytest.param(
            ["tests/test_stage_1.py::test_cli_server_and_client_show_round_trips_like_ping"],
            ["-m stage_1.server", "-m stage_1.client"],
            id="cli",
        ),
        pytest.param(
            ["tests/test_docs_commands.py", "-k", "documented_commands_work and stage_1 and Verify"],
            ["-m stage_1.server", "-m stage_1.client --count 3"],
            id="documented-commands",
        ),
    ],
)
def test_stage_dir_copy_is_what_the_tests_run(tmp_path: Path, selection: list[str], importers: list[str]) -> None:
    run, imported_by = run_tests_on_a_copy(tmp_path, "stage_1", *selection)
    if "1 skipped" in run.stdout:
        pytest.skip(f"the selected test skips here:\n{run.stdout}")
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr
    for importer in importers:
        assert importer in imported_by, f"no process ran {importer!r} on the copy; the copy was imported by:\n" + (
            imported_by or "(nobody)"
        )
