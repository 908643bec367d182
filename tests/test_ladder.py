"""A fix is written once: the stages match their recorded ladder, and the ladder tool carries a fix forward.

The first test is the guard: it fails when a stage changed without the ladder, so a fix made to one
stage and missing from a later one can't go unnoticed. The others run the tool (`python3 -m
tools.ladder`, see ladder/README.md) on a copy of a few real stages in a temporary folder.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # last: workshop mode puts the stages (or a learner's copies) first
from tools import ladder  # noqa: E402  (the repository root is not on the tests' path by default)

# A line that stages 1-3 share, in a file each of them changes elsewhere.
OLD = 'raise ProtocolError("line is not ascii text") from None'
NEW = 'raise ProtocolError("line is not ASCII text") from None'
COPIED = ("stage_0", "stage_1", "stage_2", "stage_3")


def test_every_stage_matches_its_recorded_step() -> None:
    problems = ladder.check(ROOT)
    assert not problems, "\n".join(problems)


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tools.ladder", "--root", str(root), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """Stages 0-3 of the repository in a folder of their own, with their ladder freshly recorded."""
    for stage in COPIED:
        shutil.copytree(ROOT / stage, tmp_path / stage, ignore=shutil.ignore_patterns("__pycache__"))
    recorded = run(tmp_path, "record")
    assert recorded.returncode == 0, recorded.stderr
    assert run(tmp_path, "check").returncode == 0
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: expected {old!r} once"
    path.write_text(text.replace(old, new))


def assert_no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr + done.stdout


def test_a_fix_in_an_early_stage_reaches_every_later_stage(copy: Path) -> None:
    before = snapshot(copy)
    edit(copy / "stage_1" / "protocol.py", OLD, NEW)

    checked = run(copy, "check")
    assert checked.returncode == 1
    assert_no_traceback(checked)
    # A stage edited on its own breaks the step into it and the step out of it: one problem, named.
    assert len(checked.stderr.splitlines()) == 1
    assert "stage_1 was edited" in checked.stderr
    assert "python3 -m tools.ladder forward 1" in checked.stderr

    carried = run(copy, "forward", "1")
    assert carried.returncode == 0, carried.stdout + carried.stderr
    for stage in ("stage_2", "stage_3"):
        assert f"{stage}: changed protocol.py" in carried.stdout
    assert run(copy, "check").returncode == 0

    after = snapshot(copy)
    for path, content in before.items():
        stage, _, name = path.partition("/")
        if stage in ("stage_1", "stage_2", "stage_3") and name == "protocol.py":
            # The edit reached the file, and nothing else in it changed.
            assert after[path] == content.replace(OLD.encode(), NEW.encode()), path
        elif stage != "ladder":
            assert after[path] == content, f"{path} changed"
    assert after.keys() == before.keys()


def test_the_check_names_a_stale_stage(copy: Path) -> None:
    # The fix made by hand to stages 1 and 2, forgotten in stage 3.
    for stage in ("stage_1", "stage_2"):
        edit(copy / stage / "protocol.py", OLD, NEW)
    checked = run(copy, "check")
    assert checked.returncode == 1
    assert_no_traceback(checked)
    stale = [line for line in checked.stderr.splitlines() if "ladder/stage_3.patch" in line]
    assert len(stale) == 1
    assert "stage_3 is stale" in stale[0]
    assert "python3 -m tools.ladder forward 2" in stale[0]

    assert run(copy, "forward", "2").returncode == 0
    assert NEW in (copy / "stage_3" / "protocol.py").read_text()
    assert run(copy, "check").returncode == 0


def test_a_conflict_stops_with_markers_and_records_nothing(copy: Path) -> None:
    # Stage 2 rewrote the line (and stage 3 kept it so), the ladder knows it; now stage 1 changes it its own way.
    for stage in ("stage_2", "stage_3"):
        edit(copy / stage / "protocol.py", OLD, 'raise ProtocolError("not ascii") from None')
    assert run(copy, "record").returncode == 0
    before = snapshot(copy)
    edit(copy / "stage_1" / "protocol.py", OLD, NEW)

    carried = run(copy, "forward", "1")
    assert carried.returncode == 1
    assert_no_traceback(carried)
    assert "stage_2/protocol.py: 1 conflict(s)" in carried.stdout
    assert "recorded nothing" in carried.stdout
    merged = (copy / "stage_2" / "protocol.py").read_text()
    assert "<<<<<<< stage_2\n" in merged
    assert "=======\n" in merged
    assert ">>>>>>> stage_1\n" in merged
    after = snapshot(copy)
    for path, content in before.items():
        if path.startswith(("ladder/", "stage_3/")):
            assert after[path] == content, f"{path} changed"

    # Resolved by hand (stage 1's version wins), stage 2 is carried on from there.
    lines = merged.splitlines(keepends=True)
    start, middle, end = (next(i for i, line in enumerate(lines) if line.startswith(m)) for m in ("<<<", "===", ">>>"))
    (copy / "stage_2" / "protocol.py").write_text("".join(lines[:start] + lines[middle + 1 : end] + lines[end + 1 :]))
    assert run(copy, "forward", "2").returncode == 0
    assert NEW in (copy / "stage_3" / "protocol.py").read_text()
    assert run(copy, "check").returncode == 0


def test_an_added_file_reaches_every_later_stage_and_a_deleted_one_leaves(copy: Path) -> None:
    for stage in COPIED:
        (copy / stage / "old_helper.py").write_text('"""Going away."""\n')
    assert run(copy, "record").returncode == 0
    (copy / "stage_1" / "helper.py").write_text('"""A new module."""\n\nANSWER = 42\n')
    (copy / "stage_1" / "old_helper.py").unlink()

    carried = run(copy, "forward", "1")
    assert carried.returncode == 0, carried.stdout + carried.stderr
    for stage in ("stage_2", "stage_3"):
        assert (copy / stage / "helper.py").read_text() == '"""A new module."""\n\nANSWER = 42\n'
        assert not (copy / stage / "old_helper.py").exists()
    assert not (copy / "stage_0" / "helper.py").exists()
    assert (copy / "stage_0" / "old_helper.py").exists()
    assert run(copy, "check").returncode == 0


def test_stages_go_in_numeric_order_and_a_new_stage_needs_recording(copy: Path) -> None:
    shutil.copytree(copy / "stage_3", copy / "stage_14")
    assert ladder.stages(copy) == ["stage_0", "stage_1", "stage_2", "stage_3", "stage_14"]
    checked = run(copy, "check")
    assert checked.returncode == 1
    assert "ladder/stage_14.patch is missing" in checked.stderr
    recorded = run(copy, "record")
    assert "recorded ladder/stage_14.patch (stage_3 -> stage_14)" in recorded.stdout
    assert (copy / "ladder" / "stage_14.patch").read_text().startswith("# ladder step stage_3 -> stage_14:")
    assert run(copy, "check").returncode == 0


def test_a_readme_is_not_stage_code(copy: Path) -> None:
    with (copy / "stage_2" / "README.md").open("a") as page:
        page.write("\nA sentence for this page only.\n")
    assert run(copy, "check").returncode == 0


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"a.py": "x = 1\n"}, {"a.py": "x = 1"}),  # the newline at the end goes
        ({"a.py": "x = 1"}, {"a.py": "x = 2"}),  # no newline at the end, before or after
        ({}, {"empty.py": ""}),  # an empty file is added
        ({"gone.py": "a\nb\n"}, {}),  # a file is deleted
        ({"a.py": "a\f\nb\rc\n" * 50}, {"a.py": "a\f\nb\rc\n" * 20 + "new\n" + "a\f\nb\rc\n" * 30}),  # \f, \r
        ({"sub/a.html": "<p>\n"}, {"sub/a.html": "<p>\n</p>\n"}),
    ],
)
def test_a_step_applies_both_ways(old: dict[str, str], new: dict[str, str]) -> None:
    text = ladder.diff_stages("stage_1", old, "stage_2", new)
    patch = ladder.parse_patch(text, "test")
    assert ladder.apply_patch(old, patch) == new
    assert ladder.apply_patch(new, patch, reverse=True) == old


def test_every_recorded_step_applies_both_ways() -> None:
    for step in ladder.steps(ROOT):
        patch = ladder.parse_patch((ROOT / step.patch).read_text(), step.patch)
        base, target = ladder.read_stage(ROOT, step.base), ladder.read_stage(ROOT, step.target)
        assert ladder.apply_patch(base, patch) == target, step
        assert ladder.apply_patch(target, patch, reverse=True) == base, step
