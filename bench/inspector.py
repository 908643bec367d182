"""What the inspector costs: keep-alive requests/s through stage 22 with it on, and with --no-inspect, on each loop.

    python3 -m bench.inspector                 # 5 rounds of `wrk -c 16 -d 5s`, both loops, interleaved
    python3 -m bench.inspector --rounds 9 --seconds 10 --loops uvloop
    python3 -m bench.inspector --stage stage_19 --connections 50   # the stage 19 measure of issue 15

Each round starts the tunnels afresh in front of the same origin, as stage 16's bench path does
(bench/paths.py): a server with a certificate made by the stage's `certs` module (once per run), a
client trusting that CA over TLS, a secret on both sides, a TCP tunnel (its own port, so wrk needs
no Host header; the client's observer sees the same HTTP either way), and the inspector on port 0
or off. Stage 22 runs once per event loop (`--loop asyncio`, `--loop uvloop`, both programs); a
loop that cannot run here (uvloop not installed) is reported with the reason and skipped. Each
round measures every loop's tunnel with the inspector on and off, one after the other, the order
alternating from round to round, and stops them. The ratio is taken within each round, so that
load from the rest of the machine hits both alike; the medians are printed. Nothing has the
inspector's page open: this is the cost of observing and storing every exchange, not of a
browser reading the feed. `python3 -m bench --speed` runs the same after its own rounds.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .paths import (
    HOST,
    LISTENING,
    LOOP_LOGGED,
    LOOPS,
    ROOT,
    SECRET,
    UVLOOP_INSTALL,
    PathUnavailable,
    Process,
    Stopped,
    stop_on_termination,
    uvloop_site,
    wait_until_served,
)
from .scenarios import wrk_keep_alive

STAGE = "stage_22"  # speed (issue 26): the inspector parses lazily
VARIANTS = {"inspector on": ["--inspect-port", "0"], "--no-inspect": ["--no-inspect"]}
GOAL = 0.85  # issue 26 (issue 15's was 0.8)


def certificates(work: Path, stage: str = "stage_19") -> tuple[list[str], list[str]]:
    """A CA and a server certificate for 127.0.0.1 (the stage's certs module); the server's and client's flags."""
    certs = work / "certs"
    argv = [sys.executable, "-S", "-m", f"{stage}.certs", str(certs), HOST]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise PathUnavailable(f"{stage}.certs failed: {(done.stderr or done.stdout).strip()[-200:]}")
    return ["--cert", str(certs / "server.pem"), "--key", str(certs / "server.key")], ["--ca", str(certs / "ca.pem")]


def start_tunnel(
    origin: tuple[str, int],
    client_flags: list[str],
    work: Path,
    tls: tuple[list[str], list[str]],
    stage: str = STAGE,
    loop: str | None = None,
) -> tuple[list[Process], int]:
    """The stage's server and client (a TCP tunnel, over TLS) in front of `origin`; the processes and its port."""
    env = {**os.environ, "NGROK_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    env.pop("NGROK_LOOP", None)
    if stage in LOOPS and (site := uvloop_site()):  # as bench/paths.py does: -S, and uvloop's folder only
        env["PYTHONPATH"] = site
    looped = ["--loop", loop] if loop else []
    # From stage 21 the server also listens for TLS tunnels' users (default 60626): any free port, so two can run.
    tls_port = ["--tls-port", "0"] if int(stage.removeprefix("stage_")) >= 21 else []
    ports = ["--control-port", "0", "--public-port", "0", *tls_port, *tls[0], *looped]
    processes: list[Process] = []
    try:
        server = Process.start("server", [sys.executable, "-S", "-m", f"{stage}.server", *ports], work, ROOT, env)
        processes.append(server)
        control = int(server.wait_for(LISTENING.format(role="control"))[2])
        argv = [sys.executable, "-S", "-m", f"{stage}.client", f"{origin[0]}:{origin[1]}", HOST, "--control-port"]
        argv += [str(control), *tls[1], "--tcp", *client_flags, *looped]
        processes.append(Process.start("client", argv, work, ROOT, env))
        tunnel = int(server.wait_for(LISTENING.format(role="tcp"))[2])  # bound once the client is in
        wait_until_served((HOST, tunnel), processes)
        for process in processes if loop else ():  # the loop asked for, not a silent fallback
            process.wait_for(LOOP_LOGGED.format(loop=loop))
    except BaseException:  # it did not start, or Ctrl-C or SIGTERM came meanwhile: stop what did start
        for process in reversed(processes):
            process.stop()
        raise
    return processes, tunnel


def measure(
    origin: tuple[str, int],
    rounds: int,
    seconds: float,
    connections: int,
    stage: str = STAGE,
    loops: tuple[str, ...] | None = None,
    say: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Interleaved rounds of inspector on vs off, per loop: {loop: {on, off, ratios, ratio} or {reason}}.

    A stage without `--loop` (before 22) is measured once, under the loop name "asyncio".
    """
    if not loops:
        loops = LOOPS.get(stage, ("asyncio",))
    results: dict[str, Any] = {}
    for loop in loops:
        if loop == "uvloop" and uvloop_site() is None:
            results[loop] = {"reason": f"not installed: uvloop ({UVLOOP_INSTALL})"}
            say(f"{loop}: not measured, {results[loop]['reason']}")
    live = [loop for loop in loops if loop not in results]
    if not (ROOT / stage / "__init__.py").is_file():
        for loop in live:
            results[loop] = {"reason": f"not present: the repository has no {stage}/ yet"}
        return results
    work = Path(tempfile.mkdtemp(prefix="bench-inspector-"))
    try:
        tls = certificates(work, stage)
        for loop in live:
            results[loop] = {"on": [], "off": [], "ratios": []}
        for round_number in range(rounds):
            order = live if round_number % 2 == 0 else list(reversed(live))
            for loop in order:
                names = list(VARIANTS) if round_number % 2 == 0 else list(reversed(VARIANTS))
                got = {}
                for name in names:
                    processes, public = start_tunnel(
                        origin, VARIANTS[name], work, tls, stage, loop if stage in LOOPS else None
                    )
                    try:
                        got[name] = wrk_keep_alive((HOST, public), seconds, connections)["rps"]
                    finally:
                        for process in reversed(processes):
                            process.stop()
                entry = results[loop]
                entry["on"].append(got["inspector on"])
                entry["off"].append(got["--no-inspect"])
                entry["ratios"].append(got["inspector on"] / got["--no-inspect"])
                shown = ", ".join(f"{name} {got[name]:,.0f} req/s" for name in VARIANTS)
                say(f"round {round_number + 1} {loop}: {shown}; ratio {entry['ratios'][-1]:.2f}")
        for loop in live:
            entry = results[loop]
            entry["ratio"] = statistics.median(entry["ratios"])
            say(
                f"{loop}: inspector on median {statistics.median(entry['on']):,.0f} req/s, --no-inspect "
                f"{statistics.median(entry['off']):,.0f} req/s; median ratio {entry['ratio']:.2f} (goal >= {GOAL})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    """Command line: python -m bench.inspector [--rounds N] [--seconds S] [--connections C] [--stage S] [--loops L]."""
    parser = argparse.ArgumentParser(prog="python -m bench.inspector", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (default: %(default)s, as issue 26)")
    parser.add_argument("--stage", default=STAGE, help="a stage with an inspector, 18 on (default: %(default)s)")
    parser.add_argument("--loops", help="comma-separated, for a stage with --loop (default: asyncio,uvloop)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("error: needs wrk (apt-get install wrk)")
    if shutil.which("openssl") is None:
        sys.exit("error: needs openssl, which makes the certificates (apt-get install openssl)")
    loops = tuple(args.loops.split(",")) if args.loops else None
    if loops and (unknown := set(loops) - set(LOOPS.get(args.stage, ()))):
        sys.exit(f"error: {args.stage} has no loop {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="bench-inspector-origin-"))
    origin: Process | None = None
    stop_on_termination()
    try:
        origin_argv = [sys.executable, "-m", "bench.origin", "--host", HOST, "--port", "0"]
        origin = Process.start("origin", origin_argv, work, ROOT, dict(os.environ))
        match = origin.wait_for(r"origin port listening on (\S+):(\d+)")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        results = measure(
            (match[1], int(match[2])), args.rounds, args.seconds, args.connections, args.stage, loops, say=print
        )
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except PathUnavailable as exc:
        sys.exit(f"error: {exc}")
    except Stopped as stopped:  # SIGTERM or SIGHUP: the `finally` blocks stop every process, as on Ctrl-C
        print(f"bench.inspector: stopped by {stopped.signal.name}", file=sys.stderr)
        sys.exit(128 + stopped.signal)  # what a shell reports for a program the signal ended
    except KeyboardInterrupt:
        sys.exit("bench.inspector: interrupted")
    finally:
        if origin is not None:
            origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    if not any("ratio" in entry for entry in results.values()):
        sys.exit("error: nothing was measured")


if __name__ == "__main__":
    main()
