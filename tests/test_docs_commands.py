"""Every terminal session the docs show is run, and does what the docs say it does.

The docs show commands in ```console blocks (see docs/tools/doccommands.py for the convention).
Each section's blocks are run as one scenario, in a private network namespace so that the fixed
ports the docs use (54286, 60623, ...) cannot collide with anything else on the machine.
A command that stops working, output that changes, or a new command in a "Verify it yourself"
section that is not in a console block (so would not be run) fails these tests.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("curl", "nc", "ss")  # what the documented commands use besides Python


def load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("doccommands", ROOT / "docs" / "tools" / "doccommands.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["doccommands"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


doccommands = load_runner()
SCENARIOS = doccommands.scenarios()


@cache
def netns_prefix() -> list[str] | None:
    """How to start a process in a new network namespace here, or None if this machine can't."""
    for prefix in (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def in_verify_sections(path: Path) -> "list[doccommands.Section]":
    """The sections of a page under a "Verify it yourself" heading, its subsections included."""
    inside, found = False, []
    for section in doccommands.parse(path):
        inside = section.is_verify or (inside and section.level > 2)
        if inside:
            found.append(section)
    return found


def test_every_stage_has_verify_commands() -> None:
    for stage in sorted(ROOT.glob("stage_[0-9]*")):
        if not (stage / "client.py").is_file():
            continue  # a stage still being written has nothing to run yet (its README says so)
        readme = stage / "README.md"
        assert any(s.commands for s in in_verify_sections(readme)), f"{readme}: no console commands to verify"


def test_verify_sections_show_commands_only_in_console_blocks() -> None:
    """A command shown any other way in a "Verify it yourself" section would escape these tests."""
    problems = []
    for path in doccommands.doc_files():
        shown = {c.text for s in doccommands.parse(path) for c in s.commands}
        for section in in_verify_sections(path):
            for line, lang in section.other_fences:
                if lang != "mermaid":
                    problems.append(f"{section.path}:{line}: a ```{lang or 'plain'} block; use ```console")
            for line, code in section.inline_code:
                if re.match(r"(python3? -m|curl) ", code) and code not in shown:
                    problems.append(f"{section.path}:{line}: `{code}` is not run in any console block")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[re.sub(r"\W+", "-", s.name).strip("-") for s in SCENARIOS])
def test_documented_commands_work(scenario: "doccommands.Section") -> None:
    prefix = netns_prefix()
    if prefix is None:
        pytest.skip("needs a private network namespace (unshare --net) so the documented fixed ports are free")
    text = " ".join(c.text for c in scenario.commands)
    for tool in TOOLS:
        if re.search(rf"(^|[|;&(] *){tool} ", text) and shutil.which(tool) is None:
            pytest.skip(f"the documented commands use `{tool}`, which is not installed")
    index = [s for s in doccommands.parse(ROOT / scenario.path) if s.commands].index(scenario)
    runner = [sys.executable, str(ROOT / "docs" / "tools" / "doccommands.py"), "run", scenario.path, str(index)]
    done = subprocess.run([*prefix, *runner, "--netns"], capture_output=True, text=True, timeout=55, cwd=ROOT)
    assert done.returncode == 0, f"{scenario.name}\n{done.stdout}{done.stderr}"


# --- the runner itself must be able to fail ---------------------------------------------------------


def run_markdown(tmp_path: Path, text: str) -> "doccommands.Result":
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent(text))
    [section] = [s for s in doccommands.parse(page, tmp_path) if s.commands]
    return doccommands.run_scenario(section)


def test_runner_fails_when_output_differs(tmp_path: Path) -> None:
    result = run_markdown(tmp_path, "```console\n$ echo hello 42\ngoodbye 42\n```\n")
    assert result.problems and "goodbye" in result.problems[0]


def test_runner_accepts_other_numbers_and_elided_lines(tmp_path: Path) -> None:
    result = run_markdown(tmp_path, "```console\n$ printf 'a 1\\nb\\nc 3f2a9c1e77\\n'\na 7\n...\nc 0011aabbcc\n```\n")
    assert result.problems == []


def test_runner_fails_when_a_command_fails(tmp_path: Path) -> None:
    result = run_markdown(tmp_path, "```console\n$ false\n```\n")
    assert result.problems and "exited with 1" in result.problems[0]


def test_runner_stops_a_background_command_with_ctrl_c(tmp_path: Path) -> None:
    script = "import time; print('ready', flush=True); time.sleep(60)"
    result = run_markdown(tmp_path, f'```console\n$ python -c "{script}"\nready\n^C\n$ echo next\nnext\n```\n')
    # Python's default Ctrl-C is a KeyboardInterrupt traceback and exit status 1: the docs
    # promise a clean exit, so the runner must report it.
    assert result.problems and "after Ctrl-C" in result.problems[0]
    assert "next" in result.transcript
