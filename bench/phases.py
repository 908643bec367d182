"""Where a tunnel's time goes, from the cProfile files of `python3 -m bench --profile DIR`.

    python3 -m bench --speed --paths stage_22 --scenarios ab --rounds 1 --profile prof
    python3 -m bench.phases prof              # Markdown: a column per process, phases then top functions

Each function's own time (cProfile's tottime) is put in one phase of a new connection by its file
and name, first rule that matches: the loop waiting for events (epoll's `poll`; under uvloop the
whole of libuv's loop, which cProfile sees as one call, so that its own work is in there too: it is
left out of the shares), logging and tracebacks, the inspector, TLS, frames, then accept, SYN (the
stream's open frame), close, connect to the app, first bytes (reading, writing, relaying), the
rest of the tunnel's code, and the rest of the event loop's Python code. cProfile adds its own
cost to every Python call, so read the shares, not the seconds; the CPU per request from /proc
(the bench's tables) is the absolute figure.
A built-in that no rule names (`len`, `str.format`, ...) is charged to the functions that called
it, in proportion. The last start of each path (its highest number) is the one read.
"""

import argparse
import pstats
import re
import sys
from pathlib import Path

WAIT = "waiting for events (epoll; uvloop: all of libuv)"
RULES: tuple[tuple[str, str, str], ...] = (  # (phase, regex on the file, regex on the function's name)
    (WAIT, r"^~$", r"^<method 'poll' of 'select\.epoll' objects>$"),
    (WAIT, r"asyncio/runners\.py$", r"^run$"),  # uvloop: the C loop runs inside Runner.run
    ("logging and tracebacks", r"(logging/|traceback\.py|linecache\.py)", r""),
    ("logging and tracebacks", r"^~$", r"^<built-in method builtins\.print>$"),
    ("the inspector", r"/(observe|capture|inspector|pages)\.py$", r""),
    ("TLS", r"(ssl\.py|sslproto\.py)$", r""),
    ("TLS", r"^~$", r"_ssl\."),
    ("frames", r"/frames\.py$", r""),
    ("accept", r"", r"accept|connection_made"),
    ("SYN (a stream's open frame)", r"/(mux|relay|server|client|session|tunnels)\.py$", r"open|syn"),
    ("close", r"", r"close|shutdown|connection_lost|eof_received|reset|rst"),  # before connect: connection_lost
    ("connect to the app", r"", r"connect|getaddrinfo"),
    (
        "first bytes: read, relay, write",
        r"",
        r"data_received|buffer_updated|get_buffer|recv|send|write|flush|"
        r"on_data|dispatch|read_ready|write_ready",
    ),
    ("the tunnel's other code", r"/stage_\d+/", r""),
    ("the event loop's Python code", r"asyncio/|selectors\.py", r""),
)
OTHER = "other"


def phase(file: str, name: str) -> str:
    """The phase a function belongs to (RULES, first match)."""
    for label, on_file, on_name in RULES:
        if re.search(on_file, file) and re.search(on_name, name):
            return label
    return OTHER


def latest(directory: Path) -> dict[tuple[str, str], Path]:
    """{(path label, module): its last start's .prof file}."""
    found: dict[tuple[str, str], tuple[int, Path]] = {}
    for prof in directory.glob("*.prof"):
        match = re.fullmatch(r"(.+)-(stage_\d+\.\w+)-(\d+)\.prof", prof.name)
        if match:
            key, number = (match[1], match[2]), int(match[3])
            if key not in found or found[key][0] < number:
                found[key] = (number, prof)
    return {key: value[1] for key, value in sorted(found.items())}


def own_times(prof: Path) -> dict[tuple[str, str], float]:
    """{(file, function): own seconds} of one profile."""
    table = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    found: dict[tuple[str, str], float] = {}
    for (file, _, name), entry in table.items():  # two functions of one name in one file: added up
        found[file, name] = found.get((file, name), 0.0) + entry[2]
    return found


def phase_times(prof: Path) -> dict[str, float]:
    """{phase: own seconds} of one profile; a built-in no rule names is charged to the functions that called it."""
    table = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    found: dict[str, float] = {}
    for (file, _, name), (_, _, own, _, callers) in table.items():
        where = phase(file, name)
        shares = {phase(f, n): entry[2] for (f, _, n), entry in callers.items()} if callers else {}
        if where == OTHER and file == "~" and sum(shares.values()) > 0:  # len(), str.format(), ...: the caller's
            total = sum(entry[2] for entry in callers.values())
            for (f, _, n), entry in callers.items():
                found[phase(f, n)] = found.get(phase(f, n), 0.0) + own * entry[2] / total
        else:
            found[where] = found.get(where, 0.0) + own
    return found


def report(directory: Path, top: int) -> str:
    """Markdown: the phases' shares of each process's busy time, one column per process; then its top functions."""
    files = latest(directory)
    if not files:
        raise SystemExit(f"error: no <path>-<stage>.<module>-<n>.prof files in {directory}")
    columns = [f"{label.replace('_', ' ')} {module.rsplit('.', 1)[1]}" for label, module in files]
    times = [own_times(prof) for prof in files.values()]
    phases: dict[str, list[float]] = {}
    for column, prof in enumerate(files.values()):
        for name, seconds in phase_times(prof).items():
            phases.setdefault(name, [0.0] * len(times))[column] += seconds
    busy = [sum(v[column] for p, v in phases.items() if p != WAIT) or 1.0 for column in range(len(times))]
    lines = ["Own time by phase, % of each process's busy time (cProfile)", ""]
    lines += ["| phase | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in sorted(phases, key=lambda p: (p == WAIT, -sum(phases[p]) / len(times))):
        if name == WAIT:
            cells = [f"{seconds:.1f} s, not counted" for seconds in phases[name]]
        else:
            cells = [f"{seconds / busy[column]:.0%}" for column, seconds in enumerate(phases[name])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| busy time, all phases above (s) | " + " | ".join(f"{b:.2f}" for b in busy) + " |")
    if top:
        ranked = [
            sorted(((s, f, n) for (f, n), s in entries.items() if phase(f, n) != WAIT), reverse=True)[:top]
            for entries in times
        ]
        lines += ["", f"The top {top} functions of each process by own time, % of its busy time", ""]
        lines += ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for rank in range(top):
            cells = []
            for column, found in enumerate(ranked):
                if rank < len(found):
                    seconds, file, name = found[rank]
                    where = name.strip("<>") if file == "~" else f"{Path(file).name}:{name}"
                    cells.append(f"`{where}` {seconds / busy[column]:.0%}")
                else:
                    cells.append("")
            lines.append(f"| {rank + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line: python -m bench.phases DIR [--top N]."""
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="the --profile DIR of a bench run")
    parser.add_argument("--top", type=int, default=10, help="functions listed per process (default: %(default)s)")
    parser.add_argument("--note", default="", help="a first line: which run made the files (its date, load, commit)")
    args = parser.parse_args()
    sys.stdout.write((args.note and args.note + "\n\n") + report(args.directory, args.top))


if __name__ == "__main__":
    main()
