"""The benchmark still runs: its smallest mode end to end, so the bench code cannot rot.

No figure is asserted (a test cannot know how fast this machine is); what is checked
is that every path and scenario produced numbers and that the reports are written.
"""

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MISSING = [tool for tool in ("socat", "wrk", "ab") if shutil.which(tool) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed (apt-get install socat wrk apache2-utils)"
)


def run_bench(*args: str, output: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    report = json.loads((output / "latest.json").read_text()) if (output / "latest.json").exists() else {}
    return done, report


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_smallest_run_measures_every_path_and_writes_the_reports(tmp_path: Path) -> None:
    done, report = run_bench(output=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    paths = report["paths"]
    assert isinstance(paths, list)
    # Every stage the bench knows is in the repository, so every path must start:
    # a stage that fails to start fails this test instead of quietly dropping out.
    reasons = {p["label"]: p["reason"] for p in paths if not p["available"]}
    assert reasons == {}
    available = [p["label"] for p in paths]
    assert available == ["direct", "socat", "stage 0", "stage 3", "stage 4"]
    measurements = report["measurements"]
    assert isinstance(measurements, list)
    measured = {(m["scenario"], m["path"]) for m in measurements if "metrics" in m}
    scenarios = {"idle", "ttfb", "ab", "wrk", "bulk_up", "bulk_down"}
    assert measured == {(s, p) for s in scenarios for p in available}
    for m in measurements:
        if m["scenario"] == "idle":
            assert m["metrics"]["served"] == m["metrics"]["count"], m
    markdown = (tmp_path / "latest.md").read_text()
    assert "| Bulk upload (MB/s)" in markdown
    assert "| | socat ÷ direct | stage 0 ÷ direct | stage 3 ÷ direct | stage 4 ÷ direct |" in markdown
    # The speed goals belong to stage 5: stages 0, 3 and 4 are reported without one.
    assert "goals" not in report
    assert "**Goals**\n\nNone for the paths measured here. The speed goals belong to stage 5" in markdown
    assert "| Goal |" not in markdown
    assert ET.fromstring((tmp_path / "latest.svg").read_text()).tag.endswith("svg")


@pytest.mark.timeout(60)
def test_a_path_that_cannot_start_is_reported_not_measured(tmp_path: Path) -> None:
    broken = tmp_path / "broken_stage"
    broken.mkdir()
    (broken / "__init__.py").write_text('"""A stage copy without its client module."""\n')
    out = tmp_path / "out"
    done, report = run_bench(
        "--paths", "direct", "--scenarios", "ttfb", "--variant", f"broken=stage_0:{broken}", output=out
    )
    assert done.returncode == 0, done.stderr[-2000:]
    entry = next(p for p in report["paths"] if p["label"] == "broken")
    assert entry["available"] is False and "stage_0.client" in entry["reason"]
    assert "**broken: not measured.**" in (out / "latest.md").read_text()
    assert all(m["path"] == "direct" for m in report["measurements"])
