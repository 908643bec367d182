"""What the inspector costs: keep-alive requests/s through stage 19 with it on, and with --no-inspect.

    python3 -m bench.inspector                 # 5 rounds of `wrk -c 50 -d 5s`, interleaved
    python3 -m bench.inspector --rounds 9 --seconds 10

Each round starts both tunnels afresh in front of the same origin, as stage 16's bench path does
(bench/paths.py): a server with a certificate made by `stage_19.certs` (once per run), a client
trusting that CA over TLS, a secret on both sides, a TCP tunnel (its own port, so wrk needs no
Host header; the client's observer sees the same HTTP either way), and the inspector on port 0 or
off. It measures one then the other (the order alternates), and stops them. The ratio is taken
within each round, so that load from the rest of the machine hits both alike; the medians are
printed. Nothing has the inspector's page open: this is the cost of observing and storing every
exchange, not of a browser reading the feed.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .paths import HOST, LISTENING, ROOT, SECRET, Process, Stopped, stop_on_termination, wait_until_served
from .scenarios import wrk_keep_alive

STAGE = "stage_19"  # the live feed and replay: the most complete stage
VARIANTS = {"inspector on": ["--inspect-port", "0"], "--no-inspect": ["--no-inspect"]}


def certificates(work: Path) -> tuple[list[str], list[str]]:
    """A CA and a server certificate for 127.0.0.1 (stage_19.certs, with openssl); the server's and client's flags."""
    certs = work / "certs"
    argv = [sys.executable, "-S", "-m", f"{STAGE}.certs", str(certs), HOST]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        sys.exit(f"error: {STAGE}.certs failed: {(done.stderr or done.stdout).strip()[-200:]}")
    return ["--cert", str(certs / "server.pem"), "--key", str(certs / "server.key")], ["--ca", str(certs / "ca.pem")]


def start_tunnel(
    origin: tuple[str, int], client_flags: list[str], work: Path, tls: tuple[list[str], list[str]]
) -> tuple[list[Process], int]:
    """Stage 11's server and client (a TCP tunnel, over TLS) in front of `origin`; the processes and its port."""
    env = {**os.environ, "NGROK_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    ports = ["--control-port", "0", "--public-port", "0", *tls[0]]
    processes = []
    try:
        server = Process.start("server", [sys.executable, "-S", "-m", f"{STAGE}.server", *ports], work, ROOT, env)
        processes.append(server)
        control = int(server.wait_for(LISTENING.format(role="control"))[2])
        argv = [sys.executable, "-S", "-m", f"{STAGE}.client", f"{origin[0]}:{origin[1]}", HOST, "--control-port"]
        processes.append(
            Process.start("client", [*argv, str(control), *tls[1], "--tcp", *client_flags], work, ROOT, env)
        )
        tunnel = int(server.wait_for(LISTENING.format(role="tcp"))[2])  # bound once the client is in
        wait_until_served((HOST, tunnel), processes)
    except BaseException:  # it did not start, or Ctrl-C or SIGTERM came meanwhile: stop what did start
        for process in reversed(processes):
            process.stop()
        raise
    return processes, tunnel


def main() -> None:
    """Command line: python -m bench.inspector [--rounds N] [--seconds S] [--connections C]."""
    parser = argparse.ArgumentParser(prog="python -m bench.inspector", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("error: needs wrk (apt-get install wrk)")
    if shutil.which("openssl") is None:
        sys.exit("error: needs openssl, which makes the certificates (apt-get install openssl)")
    work = Path(tempfile.mkdtemp(prefix="bench-inspector-"))
    origin: Process | None = None
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    ratios = []
    stop_on_termination()
    try:
        tls = certificates(work)
        origin_argv = [sys.executable, "-m", "bench.origin", "--host", HOST, "--port", "0"]
        origin = Process.start("origin", origin_argv, work, ROOT, dict(os.environ))
        match = origin.wait_for(r"origin port listening on (\S+):(\d+)")
        address = (match[1], int(match[2]))
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        for round_number in range(args.rounds):
            names = list(VARIANTS) if round_number % 2 == 0 else list(reversed(VARIANTS))
            got = {}
            for name in names:
                processes, public = start_tunnel(address, VARIANTS[name], work, tls)
                try:
                    got[name] = wrk_keep_alive((HOST, public), args.seconds, args.connections)["rps"]
                finally:
                    for process in reversed(processes):
                        process.stop()
                results[name].append(got[name])
            ratios.append(got["inspector on"] / got["--no-inspect"])
            shown = ", ".join(f"{name} {got[name]:,.0f} req/s" for name in VARIANTS)
            print(f"round {round_number + 1}: {shown}; ratio {ratios[-1]:.2f}", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        for name, values in results.items():
            print(f"{name}: median {statistics.median(values):,.0f} req/s")
        print(f"inspector on / --no-inspect: median ratio {statistics.median(ratios):.2f} (goal >= 0.8)")
    except Stopped as stopped:  # SIGTERM or SIGHUP: the `finally` blocks stop every process, as on Ctrl-C
        print(f"bench.inspector: stopped by {stopped.signal.name}", file=sys.stderr)
        sys.exit(128 + stopped.signal)  # what a shell reports for a program the signal ended
    finally:
        if origin is not None:
            origin.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
