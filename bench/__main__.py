"""python -m bench [--quick | --smoke]: direct, socat, ssh -R, stage 0 and the tunnel stages, interleaved.

Each round starts every path afresh, then runs each scenario on every path in
turn (A B C D E), rotating which path goes first from round to round; the report
gives medians over the rounds and ratios taken within each round.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stage_0.relay import CHUNK_SIZE

from . import inspector, report, scenarios, tlstunnel
from .paths import (
    HOST,
    LINKED,
    LOOPS,
    ROOT,
    STAGES,
    TUNNELS,
    PathUnavailable,
    PathUnderTest,
    Process,
    Stopped,
    stop_on_termination,
)

TOOLS = {"socat": "socat", "wrk": "wrk", "ab": "apache2-utils"}
INSTALL_HINT = "apt-get install socat wrk apache2-utils"
# idle first: memory is read on fresh processes
SCENARIOS = ("idle", "ttfb", "ab", "wrk", "bulk_up", "bulk_down", "ttfb_slow", "fairness")
# Path names on the command line: a stage in LOOPS is one path per loop (stage_22_asyncio, stage_22_uvloop),
# and its bare name (stage_22) stands for all of them.
LOOP_PATHS = {f"{stage}_{loop}": (stage, loop) for stage, loops in LOOPS.items() for loop in loops}
PATH_NAMES = ["direct", "socat", "ssh", "stage_0", *(t for t in TUNNELS if t not in LOOPS), *LOOP_PATHS]
DEFAULT_PATHS = ",".join(PATH_NAMES)
# Issue 26's run (--speed): stage 22 on both loops beside ssh -R, socat and direct, ab and wrk with 16
# connections as the issue measured, and the inspector's cost on both loops (bench.inspector) after the rounds.
SPEED_PATHS = "direct,socat,ssh,stage_22"
SPEED_SCENARIOS = "idle,ttfb,ab,wrk,bulk_up,bulk_down"
SPEED_CONCURRENCY = 16
LINK_DELAY = 0.025  # the slow link of ttfb_slow: seconds added each way between a tunnel's client and server
DEFAULT_SCENARIOS = ",".join(SCENARIOS)


@dataclass(frozen=True)
class Settings:
    """How much load each scenario gets; `--quick` and `--smoke` shrink it."""

    mode: str
    rounds: int
    bulk_bytes: int
    http_seconds: int  # ab -t and wrk -d; 0 = ab does ab_requests and wrk runs 1 s
    ab_requests: int
    ttfb_samples: int
    idle_connections: int
    slow_ttfb_samples: int  # new connections timed over the 25 ms link
    fairness_seconds: float  # probing time, idle and then again during the bulk transfer
    socat_buffer: int = CHUNK_SIZE
    concurrency: int = 50  # connections of ab and wrk (issue 26's run: 16)
    inspector_rounds: int = 0  # rounds of bench.inspector after the main ones (issue 26's run only)


MODES = {
    "full": Settings("full", 5, 512 * 2**20, 4, 10_000_000, 200, 1000, 30, 3.0),
    "quick": Settings("quick", 2, 64 * 2**20, 1, 10_000_000, 50, 1000, 10, 1.5),
    "smoke": Settings("smoke", 1, 1 * 2**20, 0, 200, 5, 20, 3, 0.5),
}
# --speed: 3 s of ab and wrk, 256 MiB each way, 5 rounds, then 5 rounds of the inspector (~N min, printed).
SPEED = {
    "full": {"bulk_bytes": 256 * 2**20, "http_seconds": 3, "inspector_rounds": 5},
    "quick": {"inspector_rounds": 2},
    "smoke": {"inspector_rounds": 1},
}


def missing_tools() -> list[str]:
    """The load tools and reference relay that are not installed."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def raise_fd_limit(needed: int) -> None:
    """Held connections need file descriptors in this process and in every relay (children inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if target < needed:
        sys.exit(f"error: {needed} file descriptors needed, the hard limit is {hard}; raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _command_line(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    commit = _command_line("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD") or "unknown"
    status = _command_line("git", "-C", str(ROOT), "status", "--porcelain", "--", *STAGES, "bench", ":!bench/results")
    if dirty := sorted({line.split(maxsplit=1)[-1].split("/")[0] for line in status.splitlines() if line.strip()}):
        commit += f" + uncommitted changes in {', '.join(dirty)}"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "socat": _command_line("socat", "-V").splitlines()[1:2],
        "wrk": _command_line("wrk", "--version").splitlines()[:1],
        "ab": _command_line("ab", "-V").splitlines()[:1],
        "ssh": _command_line("ssh", "-V").splitlines()[:1],
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def measure(scenario: str, path: PathUnderTest, settings: Settings) -> dict[str, Any] | None:
    """Run one scenario on one started path; CPU time of its processes is added to the figures.

    None: the scenario does not apply to this path (a slow link needs a client and a server).
    """
    address, processes = path.address, path.processes
    if scenario == "ttfb_slow":
        if path.kind not in LINKED:
            return None
        # A fresh copy of the path with the slow link between its client and its server.
        slow = PathUnderTest(
            f"{path.label} (slow link)", path.kind, path.loop, stage_dir=path.stage_dir, link_delay=LINK_DELAY
        )
        try:
            slow.start(path.origin)
            return scenarios.time_to_first_byte(slow.address, settings.slow_ttfb_samples, warmup=2)
        finally:
            slow.stop()
    if scenario == "fairness":
        return scenarios.fairness(address, settings.fairness_seconds)
    if scenario == "idle":
        return scenarios.idle_connections(address, settings.idle_connections, processes)
    if scenario == "ttfb":
        return scenarios.time_to_first_byte(address, settings.ttfb_samples)
    if scenario == "ab":
        seconds = settings.http_seconds
        metrics = scenarios.with_cpu(
            processes,
            lambda: scenarios.ab_new_connections(address, seconds, settings.ab_requests, settings.concurrency),
        )
        return _per_unit(metrics, "cpu_us_per_request", 1e6 / max(1, metrics["complete"]))
    if scenario == "wrk":
        seconds = settings.http_seconds or 1
        metrics = scenarios.with_cpu(
            processes, lambda: scenarios.wrk_keep_alive(address, seconds, settings.concurrency)
        )
        return _per_unit(metrics, "cpu_us_per_request", 1e6 / max(1, metrics["requests"]))
    transfer = scenarios.bulk_upload if scenario == "bulk_up" else scenarios.bulk_download
    metrics = scenarios.with_cpu(processes, lambda: transfer(address, settings.bulk_bytes))
    return _per_unit(metrics, "cpu_s_per_gb", 1e9 / settings.bulk_bytes)


def _per_unit(metrics: dict[str, Any], name: str, scale: float) -> dict[str, Any]:
    cpu = sum(v for k, v in metrics.items() if k.startswith("cpu_s "))
    if cpu > 0:
        metrics[name] = cpu * scale
        metrics[f"{name}_kernel_share"] = sum(v for k, v in metrics.items() if k.startswith("cpu_sys_s ")) / cpu
    return metrics


def headline(scenario: str, metrics: dict[str, Any]) -> str:
    """A short progress line for one measurement."""
    if scenario == "idle":
        memory = " ".join(f"{v:.1f}" for k, v in metrics.items() if k.startswith("rss_kib_per_conn"))
        served = f"{metrics['served']}/{metrics['count']} served in {metrics['open_seconds']:.2f}s"
        return f"{served}, RSS KiB/conn {memory or '-'}"
    if scenario in ("ttfb", "ttfb_slow"):
        return f"median {metrics['p50_ms']:.2f} ms"
    if scenario == "fairness":
        return (
            f"p99 {metrics['idle_p99_ms']:.1f} ms idle, {metrics['busy_p99_ms']:.1f} ms beside a slow "
            f"download ({metrics['p99_ratio']:.2f}x), {metrics['failed']} failed"
        )
    if scenario in ("ab", "wrk"):
        return f"{metrics['rps']:.0f} req/s"
    return f"{metrics['mb_per_s']:.0f} MB/s"


def clean(text: str) -> str:
    """Keep this machine's paths out of the committed report."""
    return text.replace(sys.executable, "python").replace(str(ROOT), ".")


def build_paths(args: argparse.Namespace, settings: Settings) -> list[PathUnderTest]:
    """The paths asked for on the command line, in order."""
    stages = [name for name in PATH_NAMES if name.startswith("stage_")]
    kinds: dict[str, tuple[str, str | None]] = {name: (name, None) for name in PATH_NAMES}
    kinds.update(LOOP_PATHS)
    labels = {"ssh": "ssh -R"}
    names = []
    for name in args.paths.split(","):
        names += [f"{name}_{loop}" for loop in LOOPS[name]] if name in LOOPS else [name]
    paths = []
    for name in names:
        if name not in kinds:
            sys.exit(f"error: unknown path {name!r}; choose from {', '.join([*PATH_NAMES, *LOOPS])}")
        kind, loop = kinds[name]
        label = labels.get(name, name.replace("_", " "))
        paths.append(PathUnderTest(label, kind, loop, socat_buffer=settings.socat_buffer))
    for variant in args.variant:
        label, _, rest = variant.partition("=")
        name, _, directory = rest.partition(":")
        if name not in stages or not directory or not Path(directory, "__init__.py").is_file():
            sys.exit(
                f"error: --variant wants LABEL=STAGE:DIR with STAGE one of {', '.join(stages)} and DIR a stage "
                f"folder; got {variant!r}"
            )
        kind, loop = kinds[name]
        paths.append(PathUnderTest(label, kind, loop, stage_dir=Path(directory).resolve()))
    for path in paths:
        path.profile_dir = args.profile
    return paths


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Start the origin, check each path once, then run the interleaved rounds."""
    began = time.monotonic()
    raise_fd_limit(settings.idle_connections * 3 + 1024)
    paths = build_paths(args, settings)
    chosen = [s for s in args.scenarios.split(",") if s]
    if unknown := set(chosen) - set(SCENARIOS):
        sys.exit(f"error: unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    info = machine()
    origin = Process.start(
        "origin",
        [sys.executable, "-m", "bench.origin", "--host", HOST, "--port", "0"],
        Path(tempfile.mkdtemp(prefix="bench-origin-")),
        ROOT,
        {**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    records: list[dict[str, Any]] = []
    available: dict[str, str] = {}
    inspected: dict[str, Any] = {}
    try:
        match = origin.wait_for(r"origin port listening on (\S+):(\d+)")
        target = (match[1], int(match[2]))
        for path in paths:  # a path that cannot start is reported, not faked
            try:
                path.start(target)
                available[path.label] = ""
            except PathUnavailable as exc:
                available[path.label] = clean(str(exc))
                print(f"bench: {path.label} is not measured: {available[path.label]}", file=sys.stderr)
            finally:
                path.stop()
        live = [p for p in paths if not available[p.label]]
        for round_no in range(1, settings.rounds + 1):
            shift = (round_no - 1) % max(1, len(live))
            order = live[shift:] + live[:shift]
            started = []
            for path in order:
                try:
                    path.start(target)
                    started.append(path)
                except PathUnavailable as exc:
                    for scenario in chosen:
                        records.append(
                            {"round": round_no, "scenario": scenario, "path": path.label, "error": clean(str(exc))}
                        )
            try:
                for scenario in chosen:
                    for path in [p for p in order if p in started]:
                        record: dict[str, Any] = {"round": round_no, "scenario": scenario, "path": path.label}
                        try:
                            metrics = measure(scenario, path, settings)
                            if metrics is None:
                                continue  # does not apply to this path
                            record["metrics"] = metrics
                            note = headline(scenario, metrics)
                        except Exception as exc:  # one failed measurement must not end the run
                            record["error"] = clean(f"{type(exc).__name__}: {exc}")
                            note = "FAILED " + record["error"]
                        records.append(record)
                        print(f"[{round_no}/{settings.rounds}] {scenario:9} {path.label:12} {note}", file=sys.stderr)
                        time.sleep(0.2)  # let connections from the last load finish closing
            finally:
                for path in started:
                    path.stop()
        info["rounds_s"] = round(time.monotonic() - began, 1)
        if settings.inspector_rounds and "wrk" in chosen:  # keep-alive requests with the inspector on and off
            inspected = run_inspector(target, settings, paths, available)
    finally:
        for path in paths:
            path.stop()
        origin.stop()
        shutil.rmtree(origin.log_path.parent, ignore_errors=True)
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["duration_s"] = round(time.monotonic() - began, 1)
    labels = [p.label for p in paths if not available.get(p.label, "x")]
    result: dict[str, Any] = {
        "machine": info,
        "settings": {**asdict(settings), "scenarios": chosen},
        "paths": [
            {
                "label": p.label,
                "kind": p.kind,
                "variant": p.stage_dir is not None,
                "available": not available.get(p.label, "x"),
                "reason": available.get(p.label, ""),
            }
            for p in paths
        ],
        "measurements": records,
    }
    if inspected:
        result["inspector"] = inspected
    result["summary"] = report.summarize(records, labels)
    result["goals"] = report.goals(result)
    return result


def run_inspector(
    origin: tuple[str, int], settings: Settings, paths: list[PathUnderTest], available: dict[str, str]
) -> dict[str, Any]:
    """bench.inspector's rounds (inspector on vs --no-inspect) for each loop of stage 22 that ran in this run."""
    loops = tuple(p.loop for p in paths if p.kind == inspector.STAGE and p.loop and p.stage_dir is None)
    skipped = {p.loop: available[p.label] for p in paths if p.loop in loops and available[p.label]}
    live = tuple(loop for loop in loops if loop not in skipped)
    print(f"bench: the inspector, on vs --no-inspect, {', '.join(live) or 'no loop'}", file=sys.stderr)
    results: dict[str, Any] = {loop: {"reason": reason} for loop, reason in skipped.items()}
    seconds = settings.http_seconds or 1
    if live:
        try:
            results |= inspector.measure(
                origin,
                settings.inspector_rounds,
                seconds,
                settings.concurrency,
                loops=live,
                say=lambda line: print(f"[inspector] {line}", file=sys.stderr),
            )
        except Exception as exc:  # one failed measurement must not end the run
            results |= {loop: {"reason": clean(f"failed: {type(exc).__name__}: {exc}")} for loop in live}
    return {"seconds": seconds if live else 0, "connections": settings.concurrency, "loops": results}


def main() -> None:
    """Command line: see --help."""
    if "--tls-tunnel" in sys.argv[1:]:  # a run of its own, with its own options (bench/tlstunnel.py)
        tlstunnel.main([arg for arg in sys.argv[1:] if arg != "--tls-tunnel"])
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Compare direct, socat, ssh -R, stage 0 and the tunnel stages on 127.0.0.1, interleaved.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_const", dest="mode", const="quick", help="2 rounds, small transfers (~3 min)"
    )
    size.add_argument(
        "--smoke", action="store_const", dest="mode", const="smoke", help="1 tiny round (under a minute), for the tests"
    )
    parser.add_argument(
        "--speed",
        action="store_true",
        help=f"issue 26's run: paths {SPEED_PATHS} (both loops), scenarios {SPEED_SCENARIOS}, ab and wrk "
        f"-c {SPEED_CONCURRENCY}, then the inspector on both loops; writes bench/results/speed/ (~5 min)",
    )
    parser.add_argument(
        "--tls-tunnel",
        action="store_true",
        help="stage 21's TLS tunnel beside its TCP tunnel, the same TLS origin behind both (bench.tlstunnel; "
        "with --smoke, --quick, --rounds, --output); writes bench/results/tls-tunnel/ (~2 min)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5, --quick 2, --smoke 1)")
    parser.add_argument("--paths", help=f"comma-separated (default: {DEFAULT_PATHS}; --speed: {SPEED_PATHS})")
    parser.add_argument(
        "--scenarios", help=f"comma-separated (default: {DEFAULT_SCENARIOS}; --speed: {SPEED_SCENARIOS})"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=STAGE:DIR",
        help=f"also measure a copy of {', '.join(('stage_0', *TUNNELS))} from DIR, "
        "e.g. 'stage 0 v2=stage_0:../my_stage_0' (repeatable)",
    )
    parser.add_argument("--profile", type=Path, metavar="DIR", help="run the stages under cProfile, .prof files in DIR")
    parser.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="write latest.md, latest.json, latest.svg here (default: bench/results for a full run of every "
        "path and scenario, nothing otherwise)",
    )
    args = parser.parse_args()
    settings = MODES[args.mode or "full"]
    defaults = (SPEED_PATHS, SPEED_SCENARIOS) if args.speed else (DEFAULT_PATHS, DEFAULT_SCENARIOS)
    standard = args.paths in (None, defaults[0]) and args.scenarios in (None, defaults[1])
    args.paths, args.scenarios = args.paths or defaults[0], args.scenarios or defaults[1]
    if args.speed:
        changes = {**SPEED[settings.mode], "concurrency": SPEED_CONCURRENCY}
        settings = Settings(**{**asdict(settings), **changes, "mode": f"{settings.mode} --speed"})
    if args.rounds:  # the inspector's rounds too, in a --speed run
        rounds = {"rounds": args.rounds, "inspector_rounds": args.rounds if settings.inspector_rounds else 0}
        settings = Settings(**{**asdict(settings), **rounds})
    if missing := missing_tools():
        sys.exit(f"error: {', '.join(missing)} not found; install the tools with: {INSTALL_HINT}")
    stop_on_termination()
    try:
        result = run(args, settings)
    except Stopped as stopped:  # SIGTERM or SIGHUP; the processes are stopped by then (finally blocks)
        print(f"bench: stopped by {stopped.signal.name}; nothing written", file=sys.stderr)
        sys.exit(128 + stopped.signal)  # what a shell reports for a program the signal ended
    except KeyboardInterrupt:  # the processes are stopped by then (finally blocks)
        sys.exit("bench: interrupted; nothing written")
    text = report.markdown(result)
    print(text)
    minutes, seconds = divmod(round(result["machine"]["duration_s"]), 60)
    rounds = result["machine"].get("rounds_s", 0)
    print(
        f"bench: the run took {minutes} min {seconds:02d} s ({rounds:.0f} s to the end of the main rounds)",
        file=sys.stderr,
    )
    # Only the standard comparison replaces the committed results; a partial run is printed.
    standard = standard and not (args.variant or args.profile)
    committed = ROOT / "bench" / "results" / ("speed" if args.speed else "")
    output = args.output or (committed if settings.mode.startswith("full") and standard else None)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "latest.md").write_text(text)
        (output / "latest.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        (output / "latest.svg").write_text(report.svg_chart(result))
        if args.speed:  # issue 26's goals alone, for the docs' performance page
            (output / "goals.md").write_text(report.goals_markdown(result))
        print(f"bench: wrote {output / 'latest.md'}, latest.json and latest.svg", file=sys.stderr)
    failed = [r for r in result["measurements"] if "error" in r]
    if failed:
        sys.exit(f"error: {len(failed)} measurement(s) failed; see the report")


if __name__ == "__main__":
    main()
