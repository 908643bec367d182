"""What routing by SNI costs: stage 21's TLS tunnel beside its TCP tunnel, the same TLS inside both.

    python3 -m bench --tls-tunnel            # 5 interleaved rounds (~2 min); writes bench/results/tls-tunnel/
    python3 -m bench --tls-tunnel --smoke    # 1 tiny round (~5 s), what tests/test_bench.py runs
    python3 -m bench.tlstunnel --rounds 9 --bulk-mib 128 --seconds 3   # any size, printed only

One origin speaks TLS with a certificate of its own for `bench.localhost` (`bench.origin --cert
--key`, the certificate made for each run by `stage_21.certs` with a CA of its own, which the
tunnel's server never sees), and three paths lead to it:

- `direct`: the load talks TLS to the origin;
- `TCP tunnel`: `stage_21.server` and `stage_21.client ORIGIN --tcp`: a port of its own, the TLS
  carried inside as any bytes;
- `TLS tunnel`: the same two programs with `--tls bench`: the load dials the server's TLS port
  (`--tls-port 0`), and the server reads the ClientHello's server name, `bench.localhost`, to find
  the tunnel; then it relays, as for the TCP tunnel.

The two tunnels differ only in how the server finds the tunnel of a new user: a port per tunnel,
or one ClientHello parsed per connection. Both clients run with `--no-inspect` (the inspector's cost
is measured on its own, `bench.inspector`), a secret on both sides and TLS on the client's link, as
the bench's other stage paths do. Every round starts each path afresh, runs each scenario on every
path in turn, rotating which path goes first, and stops them; ratios are taken within a round.

The load, TLS all through, checking the origin's certificate for `bench.localhost` with the origin's
CA (so every byte came from the origin, unchanged):

- `bulk_down`, `bulk_up`: one connection from this process (Python's `ssl`), `SOURCE n` and
  `SINK n` (TLS has no half-close, so the origin answers once it counted n bytes): MB/s, and the
  tunnel's CPU per GB;
- `ab`: `ab -c 16 -H "Host: bench.localhost" https://127.0.0.1:PORT/`, HTTP/1.0, a new TCP connection
  and a **full TLS handshake** per request (ab keeps no session to resume). ab takes the TLS
  server name from the `Host` header: the URL's host must resolve, and `bench.localhost` does not
  everywhere. Requests/s, the tunnel's CPU per request (server + client, from /proc) and the
  origin's (its share of the handshakes, the same on every path).
"""

import argparse
import functools
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .paths import (
    HOST,
    LISTENING,
    ROOT,
    SECRET,
    PathUnavailable,
    Process,
    Stopped,
    stop_on_termination,
    wait_until_served,
)
from .scenarios import SOCKET_TIMEOUT, Connect, _number, _run_tool, bulk_download, bulk_upload

STAGE = "stage_21"  # TLS tunnels by SNI (issue 25)
NAME = "bench"
SERVER_NAME = f"{NAME}.localhost"  # the server's default domain is localhost
PATHS = ("direct", "TCP tunnel", "TLS tunnel")
SCENARIOS = ("bulk_down", "bulk_up", "ab")
OUTPUT = ROOT / "bench" / "results" / "tls-tunnel"
TUNNEL_UP = r"tunnel up: ((?:tcp|tls)://\S+)"  # the client's line: the URL its users dial


@dataclass(frozen=True)
class Settings:
    """How much load each scenario gets."""

    mode: str
    rounds: int
    bulk_bytes: int
    ab_seconds: int  # ab -t; 0 = ab_requests requests
    ab_requests: int
    concurrency: int = 16  # ab -c, as issue 26's run


MODES = {
    "full": Settings("full", 5, 256 * 2**20, 3, 10_000_000),
    "quick": Settings("quick", 2, 64 * 2**20, 2, 10_000_000),
    "smoke": Settings("smoke", 1, 1 * 2**20, 0, 200),
}


def make_certificates(work: Path, folder: str, name: str) -> tuple[Path, Path, Path]:
    """`python3 -m stage_21.certs work/folder name`: a CA of its own and a certificate for `name`; (ca, cert, key)."""
    certs = work / folder
    argv = [sys.executable, "-S", "-m", f"{STAGE}.certs", str(certs), name]
    done = subprocess.run(argv, cwd=work, env=_env(work), capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise PathUnavailable(f"{STAGE}.certs failed: {(done.stderr or done.stdout).strip()[-200:]}")
    return certs / "ca.pem", certs / "server.pem", certs / "server.key"


def _env(work: Path) -> dict[str, str]:
    """The stages are imported from work/stages (a link to the repository's stage_21 or to a copy)."""
    env = {**os.environ, "PYTHONPATH": str(work / "stages"), "PYTHONUNBUFFERED": "1", "NGROK_SECRET": SECRET}
    env.pop("NGROK_LOOP", None)
    return env


def client_context(ca: Path) -> ssl.SSLContext:
    """What a user of the app trusts: the app's CA, and its name checked."""
    return ssl.create_default_context(cafile=str(ca))


class Route:
    """One way to the origin: its programs (none for direct) and the address the load dials."""

    def __init__(self, label: str, work: Path, origin: tuple[str, int], link: tuple[Path, Path, Path]) -> None:
        self.label, self.work, self.origin, self.link = label, work, origin, link
        self.processes: list[Process] = []
        self.address = origin
        self.url = ""  # what the client said its users dial: tcp://HOST:PORT or tls://bench.localhost:PORT

    def start(self, context: ssl.SSLContext) -> None:
        """Start the tunnel (server, then client) and wait until a request goes through it."""
        if self.label == "direct":
            self.url = "direct"
            wait_until_served(self.address, [], get=functools.partial(https_get, context=context))
            return
        ca, cert, key = self.link
        env = _env(self.work)
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        try:
            ports = ["--control-port", "0", "--public-port", "0", "--tls-port", "0"]
            argv = [sys.executable, "-S", "-m", f"{STAGE}.server", "--host", HOST, *ports]
            server = Process.start(
                f"{self.label} server",
                [*argv, "--cert", str(cert), "--key", str(key)],
                logs,
                self.work,
                env,
                self.processes,
            )
            control = int(server.wait_for(LISTENING.format(role="control"))[2])
            kind = ["--tcp"] if self.label == "TCP tunnel" else ["--tls", NAME]
            argv = [sys.executable, "-S", "-m", f"{STAGE}.client", f"{self.origin[0]}:{self.origin[1]}", HOST]
            argv += ["--control-port", str(control), "--ca", str(ca), "--no-inspect", *kind]
            client = Process.start(f"{self.label} client", argv, logs, self.work, env, self.processes)
            self.url = client.wait_for(TUNNEL_UP)[1]
            role = "tcp" if self.label == "TCP tunnel" else "tls"  # the tunnel's own port, or the TLS port
            self.address = (HOST, int(server.wait_for(LISTENING.format(role=role))[2]))
            wait_until_served(self.address, self.processes, get=functools.partial(https_get, context=context))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes = []


def tls(context: ssl.SSLContext, timeout: float = SOCKET_TIMEOUT) -> Connect:
    """Connections in TLS to `bench.localhost` (the origin, wherever the path leads), its certificate checked."""

    def connect(address: tuple[str, int]) -> socket.socket:
        raw = socket.create_connection(address, timeout=timeout)
        return context.wrap_socket(raw, server_hostname=SERVER_NAME)  # closes `raw` if the handshake fails

    return connect


def https_get(address: tuple[str, int], context: ssl.SSLContext, timeout: float = 5.0) -> bytes:
    """One HTTP/1.0 GET over TLS to `bench.localhost` at `address`, on a new connection; the whole response."""
    with tls(context, timeout)(address) as sock:
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {SERVER_NAME}\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def ab_handshakes(address: tuple[str, int], settings: Settings) -> dict[str, Any]:
    """`ab -c 16` over TLS, a full handshake per request; the server name comes from the Host header."""
    argv = ["ab", "-q", "-r", "-s", "10", "-c", str(settings.concurrency), "-H", f"Host: {SERVER_NAME}"]
    if settings.ab_seconds:
        argv += ["-t", str(settings.ab_seconds)]
    argv += ["-n", str(settings.ab_requests), f"https://{address[0]}:{address[1]}/"]
    out = _run_tool(argv, timeout=settings.ab_seconds + 60)
    found = re.search(r"^SSL/TLS Protocol:\s+(\S+)", out, re.MULTILINE)
    return {
        "rps": _number(r"^Requests per second:\s+([\d.]+)", out),
        "complete": int(_number(r"^Complete requests:\s+(\d+)", out)),
        "failed": int(_number(r"^Failed requests:\s+(\d+)", out))
        + int(_number(r"^Non-2xx responses:\s+(\d+)", out, 0)),
        "p50_ms": _number(r"^\s+50%\s+(\d+)", out),
        "tls": found[1] if found else "?",
        "server_name": SERVER_NAME if re.search(rf"^TLS Server Name:\s+{re.escape(SERVER_NAME)}$", out, re.M) else "?",
    }


def _cpu(processes: list[Process]) -> float:
    return sum(sum(p.cpu_times()) for p in processes)


def measure(scenario: str, path: Route, origin: Process, context: ssl.SSLContext, settings: Settings) -> dict[str, Any]:
    """One scenario on one started path, with the CPU seconds of the tunnel's processes and of the origin."""
    tunnel0, origin0 = _cpu(path.processes), _cpu([origin])
    metrics: dict[str, Any]
    if scenario == "bulk_down":
        metrics = bulk_download(path.address, settings.bulk_bytes, tls(context))
    elif scenario == "bulk_up":
        metrics = bulk_upload(path.address, settings.bulk_bytes, tls(context))
    else:
        metrics = ab_handshakes(path.address, settings)
        if metrics["failed"] or metrics["server_name"] != SERVER_NAME:
            raise RuntimeError(f"ab: {metrics['failed']} failed, server name {metrics['server_name']}")
    tunnel, served = _cpu(path.processes) - tunnel0, _cpu([origin]) - origin0
    if scenario == "ab":
        per = 1e6 / max(1, metrics["complete"])
        metrics |= {"cpu_us_per_request": tunnel * per, "origin_cpu_us_per_request": served * per}
    else:
        per = 1e9 / settings.bulk_bytes
        metrics |= {"cpu_s_per_gb": tunnel * per, "origin_cpu_s_per_gb": served * per}
    return metrics


def run(settings: Settings, stage_dir: Path | None = None, say: Callable[[str], object] = print) -> dict[str, Any]:
    """Make the certificates, start the TLS origin, then the interleaved rounds; the raw records and medians."""
    if shutil.which("ab") is None:
        raise PathUnavailable("not installed: ab (apt-get install apache2-utils)")
    if shutil.which("openssl") is None:
        raise PathUnavailable("not installed: openssl, which makes the certificates (apt-get install openssl)")
    stage = (stage_dir or ROOT / STAGE).resolve()
    if not (stage / "__init__.py").is_file():
        raise PathUnavailable(f"not present: the repository has no {STAGE}/ yet")
    began = time.monotonic()
    info: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "cores": os.cpu_count(),
        "ab": _git_free("ab", "-V").splitlines()[:1],
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "variant": stage_dir is not None,
    }
    work = Path(tempfile.mkdtemp(prefix="bench-tlstunnel-"))
    records: list[dict[str, Any]] = []
    urls: dict[str, set[str]] = {}  # per path, the URLs its client reported, with the port the load dialled
    origin: Process | None = None
    paths: list[Route] = []
    try:
        (work / "stages").mkdir()
        (work / "stages" / STAGE).symlink_to(stage)
        link = make_certificates(work, "link", HOST)  # the tunnel's own link: the server's certificate
        app_ca, app_cert, app_key = make_certificates(work, "app", SERVER_NAME)  # the app's, a CA of its own
        context = client_context(app_ca)
        argv = [sys.executable, "-m", "bench.origin", "--host", HOST, "--port", "0"]
        argv += ["--cert", str(app_cert), "--key", str(app_key)]
        origin = Process.start("origin", argv, work, ROOT, {**os.environ, "PYTHONUNBUFFERED": "1"})
        match = origin.wait_for(r"origin port listening on (\S+):(\d+)")
        target = (match[1], int(match[2]))
        paths = [Route(label, work, target, link) for label in PATHS]
        for round_no in range(1, settings.rounds + 1):
            shift = (round_no - 1) % len(paths)
            order = paths[shift:] + paths[:shift]
            try:
                for path in order:
                    path.start(context)
                    urls.setdefault(path.label, set()).add(f"{path.url} dialled at port {path.address[1]}")
                for scenario in SCENARIOS:
                    for path in order:
                        record: dict[str, Any] = {"round": round_no, "scenario": scenario, "path": path.label}
                        try:
                            record["metrics"] = measure(scenario, path, origin, context, settings)
                            note = _headline(scenario, record["metrics"])
                        except Exception as exc:  # one failed measurement must not end the run
                            record["error"] = f"{type(exc).__name__}: {exc}"
                            note = "FAILED " + record["error"]
                        records.append(record)
                        say(f"[{round_no}/{settings.rounds}] {scenario:9} {path.label:10} {note}")
                        time.sleep(0.2)  # let connections from the last load finish closing
            finally:
                for path in order:
                    path.stop()
    finally:
        for path in paths:
            path.stop()
        if origin is not None:
            origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["duration_s"] = round(time.monotonic() - began, 1)
    routes = {label: sorted(found) for label, found in urls.items()}
    result: dict[str, Any] = {"machine": info, "settings": asdict(settings), "routes": routes, "measurements": records}
    result["summary"] = summarize(records)
    return result


def _git(*args: str) -> str:
    return _git_free("git", "-C", str(ROOT), *args)


def _git_free(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def _headline(scenario: str, metrics: dict[str, Any]) -> str:
    if scenario == "ab":
        return f"{metrics['rps']:.0f} req/s, tunnel CPU {metrics['cpu_us_per_request']:.0f} µs/request"
    return f"{metrics['mb_per_s']:.0f} MB/s, tunnel CPU {metrics['cpu_s_per_gb']:.2f} s/GB"


# (scenario, field, label, unit, higher is better)
FIGURES = (
    ("bulk_down", "mb_per_s", "Bulk download", "MB/s", True),
    ("bulk_down", "cpu_s_per_gb", "Tunnel CPU per GB downloaded", "s", False),
    ("bulk_up", "mb_per_s", "Bulk upload", "MB/s", True),
    ("bulk_up", "cpu_s_per_gb", "Tunnel CPU per GB uploaded", "s", False),
    ("ab", "rps", "New connections, a full TLS handshake each (ab -c {c})", "req/s", True),
    ("ab", "cpu_us_per_request", "Tunnel CPU per new-connection request", "µs", False),
    ("ab", "origin_cpu_us_per_request", "The origin's CPU per request (its handshake)", "µs", False),
)


def _values(records: list[dict[str, Any]], scenario: str, field: str, path: str) -> dict[int, float]:
    return {
        r["round"]: float(r["metrics"][field])
        for r in records
        if r["scenario"] == scenario and r["path"] == path and field in r.get("metrics", {})
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per path, and the TLS tunnel ÷ TCP tunnel ratio per figure: the median of per-round ratios."""
    summary: dict[str, Any] = {}
    for scenario, field, _, _, _ in FIGURES:
        key = f"{scenario}.{field}"
        entry: dict[str, Any] = {}
        for path in PATHS:
            if values := _values(records, scenario, field, path):
                entry[path] = statistics.median(values.values())
        tls, tcp = _values(records, scenario, field, "TLS tunnel"), _values(records, scenario, field, "TCP tunnel")
        ratios = [tls[r] / tcp[r] for r in tls if r in tcp and tcp[r] > 0]
        if ratios:
            entry["ratio"] = statistics.median(ratios)
            entry["ratios"] = ratios
        summary[key] = entry
    return summary


def markdown(result: dict[str, Any]) -> str:
    """The report: one table, the medians of each path and the TLS tunnel ÷ TCP tunnel ratio."""
    info, settings, summary = result["machine"], result["settings"], result["summary"]
    rounds = settings["rounds"]
    lines = [
        "## A TLS tunnel beside a TCP tunnel (stage 21): what routing by SNI costs",
        "",
        f"Run {info['date']} at commit `{info['commit']}`{' (a copy of ' + STAGE + ')' if info['variant'] else ''}, "
        f"{info['cores']} cores, mode {settings['mode']}: {rounds} interleaved round(s), "
        f"{settings['bulk_bytes'] // 2**20} MiB each way, ab -c {settings['concurrency']} "
        + (f"for {settings['ab_seconds']} s" if settings["ab_seconds"] else f"-n {settings['ab_requests']}")
        + f"; load average {info['load_before']} before, {info['load_after']} after; {info['duration_s']:.0f} s.",
        "",
        "The same origin, speaking TLS with its own certificate for `bench.localhost`, reached directly, "
        "through a TCP tunnel (`--tcp`, a port of its own) and through a TLS tunnel (`--tls bench`, the "
        "server's TLS port, routed by the ClientHello's server name). Medians over the rounds; the ratio "
        "is the median of per-round ratios, TLS tunnel ÷ TCP tunnel.",
        "",
        "| figure | direct | TCP tunnel | TLS tunnel | TLS ÷ TCP |",
        "|---|---|---|---|---|",
    ]
    for scenario, field, label, unit, _ in FIGURES:
        entry = summary.get(f"{scenario}.{field}", {})
        cells = [_fmt(entry.get(path)) if not (path == "direct" and field.startswith("cpu")) else "-" for path in PATHS]
        ratio = f"{entry['ratio']:.2f}x" if "ratio" in entry and field != "origin_cpu_us_per_request" else "-"
        lines.append(f"| {label.format(c=settings['concurrency'])} ({unit}) | {' | '.join(cells)} | {ratio} |")
    failed = [r for r in result["measurements"] if "error" in r]
    for r in failed:
        lines.append(f"\nRound {r['round']}, {r['scenario']} on {r['path']}: FAILED {r['error']}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "not measured"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def report(result: dict[str, Any], output: Path | None) -> str:
    """Print the Markdown; write latest.md and latest.json into `output` when given."""
    text = markdown(result)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "latest.md").write_text(text)
        (output / "latest.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return text


def main(argv: list[str] | None = None, mode: str = "full", output: Path | None = None) -> None:
    """Command line: python -m bench.tlstunnel [--smoke | --quick] [--rounds N] [--output DIR] [--stage-dir DIR]."""
    parser = argparse.ArgumentParser(prog="python -m bench.tlstunnel", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick", help="2 rounds, 64 MiB (~1 min)")
    size.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="1 tiny round (~5 s)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--bulk-mib", type=int, help="MiB each way (default: 256, --quick 64, --smoke 1)")
    parser.add_argument("--seconds", type=int, help="ab -t (default: 3, --quick 2; --smoke: 200 requests)")
    parser.add_argument("--output", type=Path, help="write latest.md and latest.json here")
    parser.add_argument("--stage-dir", type=Path, help=f"run a copy of {STAGE} from DIR instead of the repository's")
    args = parser.parse_args(argv)
    settings = MODES[args.mode or mode]
    changes: dict[str, Any] = {}
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.bulk_mib:
        changes["bulk_bytes"] = args.bulk_mib * 2**20
    if args.seconds:
        changes["ab_seconds"] = args.seconds
    standard = not changes and not args.stage_dir and settings.mode == "full"
    settings = Settings(**{**asdict(settings), **changes})
    output = args.output or output or (OUTPUT if standard else None)
    stop_on_termination()
    try:
        result = run(settings, args.stage_dir, say=lambda line: print(line, file=sys.stderr, flush=True))
    except PathUnavailable as exc:
        sys.exit(f"error: {exc}")
    except Stopped as stopped:  # SIGTERM or SIGHUP: the `finally` blocks stopped every process
        print(f"bench.tlstunnel: stopped by {stopped.signal.name}; nothing written", file=sys.stderr)
        sys.exit(128 + stopped.signal)
    except KeyboardInterrupt:
        sys.exit("bench.tlstunnel: interrupted; nothing written")
    print(report(result, output))
    if output is not None:
        print(f"bench: wrote {output / 'latest.md'} and latest.json", file=sys.stderr)
    failed = [r for r in result["measurements"] if "error" in r]
    if failed:
        sys.exit(f"error: {len(failed)} measurement(s) failed; see the report")


if __name__ == "__main__":
    main()
