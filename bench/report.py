"""Turn the raw measurements into medians, ratios, and the Markdown, JSON and SVG reports.

Ratios are the median of per-round ratios: within one round the paths ran seconds
apart, so noise from the rest of the machine hits both sides of a ratio alike.
"""

import html
import statistics
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    """One figure of one scenario, e.g. the req/s of the `ab` scenario."""

    scenario: str
    field: str
    label: str
    unit: str
    higher_is_better: bool

    @property
    def key(self) -> str:
        """`scenario.field`, the name used in the JSON summary."""
        return f"{self.scenario}.{self.field}"


METRICS = (
    Metric("bulk_up", "mb_per_s", "Bulk upload", "MB/s", True),
    Metric("bulk_down", "mb_per_s", "Bulk download", "MB/s", True),
    Metric("ab", "rps", "New connection per request (ab -c {c})", "req/s", True),
    Metric("ab", "p50_ms", "ab: median request time", "ms", False),
    Metric("wrk", "rps", "Keep-alive requests (wrk -c {c})", "req/s", True),
    Metric("wrk", "p50_ms", "wrk: p50 latency", "ms", False),
    Metric("wrk", "p99_ms", "wrk: p99 latency", "ms", False),
    Metric("ttfb", "p50_ms", "Time to first byte, new connection: median", "ms", False),
    Metric("ttfb", "p90_ms", "Time to first byte: p90", "ms", False),
    Metric("ttfb_slow", "p50_ms", "Time to first byte over a 25 ms link (each way): median", "ms", False),
    Metric("fairness", "idle_p99_ms", "Small requests, p99, path otherwise idle", "ms", False),
    Metric("fairness", "busy_p99_ms", "Small requests, p99, beside a download to a slow reader", "ms", False),
    Metric("fairness", "p99_ratio", "Fairness: p99 beside the download ÷ idle p99", "x", False),
    Metric("fairness", "bulk_mb_per_s", "The slow reader's download meanwhile", "MB/s", True),
    Metric("idle", "served", "Concurrent connections held open and served", "conns", True),
    Metric("idle", "open_seconds", "Time to open them all (50 at a time)", "s", False),
)
# The ratios: throughputs (↑ better), and wrk's p99 latency (↓ better), which issue 26 compares with ssh -R.
RATIO_METRICS = [m for m in METRICS if m.field in ("mb_per_s", "rps") or m.key == "wrk.p99_ms"]
SSH = "ssh -R"
LIMITS = "stage 13"  # the limits stage (old stage 5): streams, flow control, resume, auth, bounds
TLS_STAGE = "stage 16"  # TLS (old stage 6)
SPEED = {"asyncio": "stage 22 asyncio", "uvloop": "stage 22 uvloop"}  # issue 26: stage 22 on each loop
SPEED_CONNECTIONS = 16  # issue 26's goals for ab and wrk are for 16 connections
TUNNEL_LABELS = ("stage 3", "stage 8", LIMITS, TLS_STAGE, *SPEED.values())  # compared with ssh -R too
CPU_ROWS = (
    ("bulk_up", "cpu_s_per_gb", "CPU per GB uploaded", "s"),
    ("bulk_down", "cpu_s_per_gb", "CPU per GB downloaded", "s"),
    ("ab", "cpu_us_per_request", "CPU per request, new connection each", "µs"),
    ("wrk", "cpu_us_per_request", "CPU per request, keep-alive", "µs"),
)


def values(records: list[Record], scenario: str, field: str, path: str) -> dict[int, float]:
    """{round: value} of one field of one scenario on one path (failed rounds are absent)."""
    found = {}
    for record in records:
        if record["scenario"] == scenario and record["path"] == path and "metrics" in record:
            value = record["metrics"].get(field)
            if isinstance(value, int | float):
                found[record["round"]] = float(value)
    return found


def summarize(records: list[Record], paths: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{metric key: {path: {median, min, max, n}}} over the rounds."""
    fields = {(m.scenario, m.field) for m in METRICS} | {(s, f) for s, f, _, _ in CPU_ROWS}
    fields |= {(s, f"{f}_kernel_share") for s, f, _, _ in CPU_ROWS}
    for record in records:
        if record["scenario"] == "idle" and "metrics" in record:
            fields |= {("idle", k) for k in record["metrics"] if "_kib_per_conn " in k}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, field in sorted(fields):
        for path in paths:
            found = list(values(records, scenario, field, path).values())
            if found:
                summary.setdefault(f"{scenario}.{field}", {})[path] = {
                    "median": statistics.median(found),
                    "min": min(found),
                    "max": max(found),
                    "n": len(found),
                }
    return summary


def ratio(records: list[Record], metric: Metric, path: str, reference: str) -> float | None:
    """Median over the rounds of path / reference, each pair taken from the same round."""
    ours = values(records, metric.scenario, metric.field, path)
    theirs = values(records, metric.scenario, metric.field, reference)
    per_round = [ours[r] / theirs[r] for r in ours if r in theirs and theirs[r] > 0]
    return statistics.median(per_round) if per_round else None


def difference(records: list[Record], metric: Metric, path: str, reference: str) -> float | None:
    """Median over the rounds of path - reference (for latencies)."""
    ours = values(records, metric.scenario, metric.field, path)
    theirs = values(records, metric.scenario, metric.field, reference)
    per_round = [ours[r] - theirs[r] for r in ours if r in theirs]
    return statistics.median(per_round) if per_round else None


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(entry: dict[str, float] | None) -> str:
    if entry is None:
        return "—"
    median = entry["median"]
    if entry["n"] < 2 or median == 0:
        return _fmt(median)
    spread = (entry["max"] - entry["min"]) / 2 / abs(median) * 100
    return f"{_fmt(median)} ±{spread:.0f}%"


def _count(entry: dict[str, float] | None) -> str:
    return (
        "—"
        if entry is None
        else f"{entry['min']:.0f}" + ("" if entry["min"] == entry["max"] else f" to {entry['max']:.0f}")
    )


def markdown(report: Record) -> str:
    """The results as Markdown tables (the docs include this file as it is)."""
    machine, settings = report["machine"], report["settings"]
    paths = [p["label"] for p in report["paths"] if p["available"]]
    summary, records = report["summary"], report["measurements"]
    connections = settings.get("concurrency", 50)
    took = machine.get("duration_s")
    lines = [
        f"Measured {machine['date']} at commit `{machine['commit']}` on {machine['cores']} cores "
        f"({machine['cpu']}), Linux {machine['kernel']}, Python {machine['python']}; "
        f"{settings['mode']} mode, {settings['rounds']} interleaved round(s), medians "
        f"(± is half the range between rounds). Load average {machine['load_before']} before, "
        f"{machine['load_after']} after"
        + ("." if took is None else f"; the run took {int(took // 60)} min {int(took % 60):02d} s."),
        "",
    ]
    for path in report["paths"]:
        if not path["available"]:
            lines += [f"**{path['label']}: not measured.** {path['reason']}", ""]
    head = "| | " + " | ".join(paths) + " |"
    rule = "|---|" + "---:|" * len(paths)
    lines += ["**Absolute figures**", "", head, rule]
    for metric in METRICS:
        entries = summary.get(metric.key, {})
        if entries:
            unit = f"of {settings['idle_connections']}" if metric.key == "idle.served" else metric.unit
            better = "" if metric.key == "idle.served" else (" ↑" if metric.higher_is_better else " ↓")
            cell = _count if metric.key == "idle.served" else _cell
            label = metric.label.format(c=connections)
            row = [f"{label} ({unit}){better}", *(cell(entries.get(p)) for p in paths)]
            lines.append("| " + " | ".join(row) + " |")
    memory_keys = sorted(k for k in summary if k.startswith("idle.rss_kib_per_conn "))
    for kind in ("rss", "pss"):
        cells = []
        for path in paths:
            parts = [
                (key.split(" ", 1)[1], summary[key][path]["median"])
                for key in sorted(k for k in summary if k.startswith(f"idle.{kind}_kib_per_conn "))
                if path in summary[key]
            ]
            if not parts:
                cells.append("—")
            elif len(parts) == 1:
                cells.append(_fmt(parts[0][1]))
            else:
                cells.append(", ".join(f"{role.split()[-1]} {_fmt(v)}" for role, v in parts))
        if memory_keys:
            lines.append(
                f"| Memory per held connection, {kind.upper()} (KiB per process) ↓ | " + " | ".join(cells) + " |"
            )
    cpu_paths = [p for p in paths if p != "direct"]
    if any(f"{s}.{f}" in summary for s, f, _, _ in CPU_ROWS):
        lines += [
            "",
            "**CPU time of the path's own processes** (user + kernel, from /proc; the load and the origin "
            "excluded; in brackets: the kernel's share)",
            "",
        ]
        lines += ["| | " + " | ".join(cpu_paths) + " |", "|---|" + "---:|" * len(cpu_paths)]
        for scenario, field, label, unit in CPU_ROWS:
            entries = summary.get(f"{scenario}.{field}", {})
            shares = summary.get(f"{scenario}.{field}_kernel_share", {})
            if entries:
                cells = [
                    _cell(entries.get(p)) + (f" ({shares[p]['median']:.0%})" if p in shares else "") for p in cpu_paths
                ]
                lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    others = [p for p in paths if p != "direct"]
    columns = [(p, "direct") for p in others if "direct" in paths]
    columns += [(p, "socat") for p in others if p != "socat" and "socat" in paths]
    columns += [(p, SSH) for p in others if p in TUNNEL_LABELS and SSH in paths]
    if columns:
        lines += ["", "**Ratios** (median of the per-round ratios; ↑ better, but for latencies)", ""]
        lines += ["| | " + " | ".join(f"{p} ÷ {ref}" for p, ref in columns) + " |", "|---|" + "---:|" * len(columns)]
        for metric in RATIO_METRICS:
            found = [ratio(records, metric, p, ref) for p, ref in columns]
            if any(r is not None for r in found):
                label = metric.label.format(c=connections) + ("" if metric.higher_is_better else " (↓ better)")
                lines.append(f"| {label} | " + " | ".join(_x(r) for r in found) + " |")
        ttfb = next(m for m in METRICS if m.key == "ttfb.p50_ms")
        deltas = [difference(records, ttfb, p, ref) for p, ref in columns]
        if any(d is not None for d in deltas):
            cells = ["—" if d is None else f"{d:+.2f} ms" for d in deltas]
            lines.append("| Time to first byte, median (difference) | " + " | ".join(cells) + " |")
    slow = [p for p in paths if p in summary.get("ttfb_slow.p50_ms", {})]
    if "stage 3" in slow:
        ttfb_slow = next(m for m in METRICS if m.key == "ttfb_slow.p50_ms")
        saved = [(p, difference(records, ttfb_slow, "stage 3", p)) for p in slow if p != "stage 3"]
        if saved:
            lines += [
                "",
                "**Time to first byte over the 25 ms link, saved against stage 3** "
                "(median of per-round differences; ↑ better)",
                "",
            ]
            lines += ["| " + " | ".join(f"{p}" for p, _ in saved) + " |", "|" + "---:|" * len(saved)]
            lines.append("| " + " | ".join("—" if d is None else f"{d:.1f} ms" for _, d in saved) + " |")
    lines += _inspector_lines(report)
    lines += [
        "",
        "**Goals** (stage 13's from issue 17, stage 16's with TLS on the client link from issue 14, stage 22's "
        "from issue 26; a benchmark, not a test: each is met or not on this run)",
        "",
    ]
    lines += ["| Goal | measured | |", "|---|---:|---|"]
    elsewhere: dict[str, int] = {}
    for goal in report.get("goals", []):
        stage = " ".join(goal["goal"].split()[:2])  # each goal names its stage first
        if goal["status"] == "not measured" and "was not in this run" in goal["note"]:
            elsewhere[stage] = elsewhere.get(stage, 0) + 1  # one line for them all, below the table
            continue
        lines.append(
            f"| {goal['goal']} | {goal['measured']} | {goal['status']}{goal['note'] and ': ' + goal['note']} |"
        )
    if elsewhere:
        shown = ", ".join(f"{stage}'s {count}" for stage, count in elsewhere.items())
        lines += ["", f"Not measured, their paths were not in this run: {shown} goal(s)."]
    if not settings["mode"].startswith("full"):
        lines += ["", f"A {settings['mode']} run: the goals above are indicative only; the full run decides them."]
    elif settings["rounds"] < 3:
        lines += ["", f"A run of {settings['rounds']} round(s): the goals above are indicative only."]
    seconds = settings["http_seconds"]
    http = f"ab and wrk {seconds} s each" if seconds else f"ab {settings['ab_requests']} requests, wrk 1 s"
    chosen = settings.get("scenarios", [])
    link = (
        " Slow link: `bench.link` between a tunnel's client and its server, 25 ms each "
        "way and one round trip per new TCP connection (this kernel has no netem), "
        f"{settings['slow_ttfb_samples']} sequential connections; paths without a client-server link: —."
    )
    fair = (
        f" Fairness: small requests at 200/s for {settings['fairness_seconds']:g} s with the path idle and "
        f"{settings['fairness_seconds']:g} s while one user downloads a 1 GiB file and reads it at 10 MB/s, "
        "in alternating windows of about 0.5 s (each download bounded by its window)."
    )
    lines += [
        "",
        f"Settings: bulk {settings['bulk_bytes'] // 2**20} MiB each way; {http} with {connections} connections; "
        f"{settings['ttfb_samples']} sequential connections for time to first byte; "
        f"{settings['idle_connections']} held connections; socat `-b {settings['socat_buffer']}` "
        "(the stage code's read size), forking a process per connection; ssh -R with OpenSSH's defaults "
        "(it encrypts)." + (link if "ttfb_slow" in chosen else "") + (fair if "fairness" in chosen else ""),
    ]
    failures = [r for r in records if "error" in r]
    if failures:
        lines += ["", f"**{len(failures)} measurement(s) failed:**", ""]
        lines += [f"- round {r['round']} {r['scenario']} {r['path']}: {r['error']}" for r in failures[:10]]
    return "\n".join(lines) + "\n"


def goals_markdown(report: Record) -> str:
    """Issue 26's goals table alone, with the run's first line (when, where, the load): the docs include it."""
    machine, settings = report["machine"], report["settings"]
    took = machine.get("duration_s", 0)
    lines = [
        f"Run of {machine['date']} at commit `{machine['commit']}`, {settings['mode']} mode, "
        f"{settings['rounds']} round(s), {int(took // 60)} min {int(took % 60):02d} s; load average "
        f"{machine['load_before']} before, {machine['load_after']} after.",
        "",
        "| Goal (issue 26) | measured | |",
        "|---|---:|---|",
    ]
    for goal in report.get("goals", []):
        if goal["goal"].startswith("stage 22 "):
            note = goal["note"] and ": " + goal["note"]
            lines.append(f"| {goal['goal'][len('stage 22 ') :]} | {goal['measured']} | {goal['status']}{note} |")
    return "\n".join(lines) + "\n"


def _inspector_lines(report: Record) -> list[str]:
    """The inspector's cost on each loop (bench.inspector's rounds, in issue 26's run only)."""
    found = report.get("inspector")
    if not found:
        return []
    lines = [
        "",
        f"**The inspector's cost** (stage 22 over TLS, a TCP tunnel: keep-alive requests, wrk -c "
        f"{found['connections']} for {found['seconds']:g} s, with the inspector on and with `--no-inspect`, "
        "started afresh and alternating; the ratio is the median of the per-round ratios)",
        "",
        "| loop | inspector on (req/s) | --no-inspect (req/s) | on ÷ off | rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for loop, entry in found["loops"].items():
        if "ratio" in entry:
            on, off = statistics.median(entry["on"]), statistics.median(entry["off"])
            per_round = ", ".join(f"{r:.2f}" for r in entry["ratios"])
            lines.append(f"| {loop} | {_fmt(on)} | {_fmt(off)} | {entry['ratio']:.2f}x | {per_round} |")
        else:
            lines.append(f"| {loop} | — | — | not measured: {entry['reason']} | |")
    return lines


def _metric(key: str) -> Metric:
    return next(m for m in METRICS if m.key == key)


def held_memory(report: Record, label: str, why: str) -> tuple[float | None, str, str]:
    """The `idle` scenario's RSS per held connection on `label`: its worst process (None if it can't be judged:
    `why`, or a reason found here), every process's as shown, and the reason."""
    records, summary, held = report["measurements"], report["summary"], report["settings"]["idle_connections"]
    if not why and held < 1000:
        why = f"this run held {held} connections; the goal is for 1000"
    served = values(records, "idle", "served", label)
    if not why and (not served or min(served.values()) < held):
        why = "not every held connection was served" if served else "no idle figures"
    memory = {
        key.split(" ", 1)[1]: entries[label]["median"]
        for key, entries in summary.items()
        if key.startswith("idle.rss_kib_per_conn ") and label in entries
    }
    worst = None if why or not memory else max(memory.values())
    shown = ", ".join(f"{role.split()[-1]} {kib:.1f} KiB" for role, kib in sorted(memory.items()))
    return worst, shown, why


def goals(report: Record) -> list[dict[str, str]]:
    """Stage 13's goals (issue 17, then "stage 5") and stage 16's (issue 14, then "stage 6"), each met, not
    met, or not measured (and why).

    Ratios and differences are medians of per-round figures, as in the tables. The other paths
    (stages 0, 3 and 8) are kept simple rather than fast and have no goal. Stage 16's are against
    ssh -R, which encrypts its link as stage 16 does.
    """
    records = report["measurements"]
    available = {p["label"]: p for p in report["paths"]}
    out: list[dict[str, str]] = []

    def add(goal: str, value: float | None, met: bool | None, shown: str, missing: str) -> None:
        if value is None or met is None:
            out.append({"goal": goal, "measured": "—", "status": "not measured", "note": missing})
        else:
            out.append({"goal": goal, "measured": shown, "status": "met" if met else "not met", "note": ""})

    def absent(*labels: str) -> str:
        reasons = []
        for label in labels:
            path = available.get(label)
            if path is None:
                reasons.append(f"{label} was not in this run")
            elif not path["available"]:
                reasons.append(f"{label}: {path['reason']}")
        return "; ".join(reasons)

    def against(scenario: str, field: str, reference: str, least: float, goal: str, path: str = LIMITS) -> None:
        why = absent(path, reference)
        value = None if why else ratio(records, _metric(f"{scenario}.{field}"), path, reference)
        why = why or f"no {scenario} figures for both"
        shown = f"{value or 0:.2f}x"
        if shown == f"{least:.2f}x":  # at the line: a third decimal says which side (0.999x is not met)
            shown = f"{value or 0:.3f}x"
        add(goal, value, None if value is None else value >= least, shown, why)

    against("ab", "rps", SSH, 1.0, "stage 13 new connections/s ≥ 1.0x ssh -R")
    against("bulk_up", "mb_per_s", "socat", 0.8, "stage 13 bulk upload ≥ 0.8x socat")
    against("bulk_down", "mb_per_s", "socat", 0.8, "stage 13 bulk download ≥ 0.8x socat")
    against("wrk", "rps", SSH, 1.5, "stage 13 keep-alive requests/s ≥ 1.5x ssh -R")

    goal = "stage 13 memory per held connection ≤ 10 KiB per process, 1000 held (RSS)"
    worst, shown, why = held_memory(report, LIMITS, absent(LIMITS))
    add(goal, worst, None if worst is None else worst <= 10, shown, why or "no memory figures")

    # Issue 17 measured this against old stage 4, a proxy connection per user as stage 3 has: stage 3 is
    # the one left with those round trips (from stage 8 on a user's first bytes ride with its stream's SYN).
    goal = "stage 13 time to first byte over the 25 ms link ≥ 45 ms below stage 3"
    why = absent(LIMITS, "stage 3")
    saved = None if why else difference(records, _metric("ttfb_slow.p50_ms"), "stage 3", LIMITS)
    add(
        goal, saved, None if saved is None else saved >= 45, f"{saved or 0:.1f} ms below", why or "no ttfb_slow figures"
    )

    goal = "stage 13 p99 of small requests beside a bulk transfer ≤ 2x the idle p99"
    why = absent(LIMITS)
    found = list(values(records, "fairness", "p99_ratio", LIMITS).values())
    fair = statistics.median(found) if found and not why else None
    add(goal, fair, None if fair is None else fair <= 2, f"{fair or 0:.2f}x", why or "no fairness figures")

    tls = "(TLS on the client link; ssh -R encrypts too)"
    against("bulk_up", "mb_per_s", SSH, 1.0, f"stage 16 bulk upload ≥ 1.0x ssh -R {tls}", TLS_STAGE)
    against("bulk_down", "mb_per_s", SSH, 1.0, f"stage 16 bulk download ≥ 1.0x ssh -R {tls}", TLS_STAGE)
    against("ab", "rps", SSH, 1.0, f"stage 16 new connections/s ≥ 1.0x ssh -R {tls}", TLS_STAGE)
    out += speed_goals(report)
    return out


def speed_goals(report: Record) -> list[dict[str, str]]:
    """Issue 26's goals for stage 22, on each loop: met, not met, or not measured (and why).

    Its figures for `ab` and `wrk` are for 16 connections (`python3 -m bench --speed`): a run with
    another count reports those as not measured. The inspector's goal needs bench.inspector's rounds,
    which only `--speed` runs.
    """
    records, summary, settings = report["measurements"], report["summary"], report["settings"]
    available = {p["label"]: p for p in report["paths"]}
    connections = settings.get("concurrency", 50)
    out: list[dict[str, str]] = []

    def add(goal: str, value: float | None, met: bool, shown: str, why: str) -> None:
        if why or value is None:
            out.append({"goal": goal, "measured": "—", "status": "not measured", "note": why or "no figures"})
        else:
            out.append({"goal": goal, "measured": shown, "status": "met" if met else "not met", "note": ""})

    def absent(*labels: str, load: bool = False) -> str:
        for label in labels:
            path = available.get(label)
            if path is None:
                return f"{label} was not in this run"
            if not path["available"]:
                return f"{label}: {path['reason']}"
        if load and connections != SPEED_CONNECTIONS:
            return f"this run used {connections} connections, the goal is for {SPEED_CONNECTIONS} (bench --speed)"
        return ""

    def against(scenario: str, field: str, least: float, goal: str, loop: str, load: bool = True) -> None:
        why = absent(SPEED[loop], SSH, load=load)
        value = None if why else ratio(records, _metric(f"{scenario}.{field}"), SPEED[loop], SSH)
        shown = f"{value or 0:.2f}x"
        if shown == f"{least:.2f}x":  # at the line: a third decimal says which side
            shown = f"{value or 0:.3f}x"
        add(goal, value, value is not None and value >= least, shown, why)

    against("ab", "rps", 0.8, "stage 22 new connections/s on asyncio's loop ≥ 0.8x ssh -R (ab -c 16)", "asyncio")
    against("ab", "rps", 1.2, "stage 22 new connections/s on uvloop ≥ 1.2x ssh -R (ab -c 16)", "uvloop")

    goal = "stage 22 tunnel CPU per new-connection request on uvloop ≤ 150 µs (ab -c 16)"
    why = absent(SPEED["uvloop"], load=True)
    cpu = summary.get("ab.cpu_us_per_request", {})
    value = None if why or SPEED["uvloop"] not in cpu else cpu[SPEED["uvloop"]]["median"]
    others = "; ".join(f"{p} {cpu[p]['median']:.0f} µs" for p in (SPEED["asyncio"], SSH) if p in cpu)
    add(goal, value, value is not None and value <= 150, f"{value or 0:.0f} µs" + (f" ({others})" * bool(others)), why)

    against("wrk", "rps", 1.6, "stage 22 keep-alive requests/s on uvloop ≥ 1.6x ssh -R (wrk -c 16)", "uvloop")
    for loop in SPEED:
        against(
            "bulk_down",
            "mb_per_s",
            1.2,
            f"stage 22 bulk download, TLS on the client link, on {loop} ≥ 1.2x ssh -R",
            loop,
            load=False,
        )
    inspected = (report.get("inspector") or {}).get("loops", {})
    for loop in SPEED:
        goal = f"stage 22 inspector on ÷ --no-inspect, keep-alive, on {loop} ≥ 0.85"
        entry = inspected.get(loop)
        if entry is None:
            why = absent(SPEED[loop]) or "the inspector's rounds did not run (python3 -m bench --speed runs them)"
        else:
            why = "" if "ratio" in entry else entry["reason"]
        value = None if why or entry is None else entry["ratio"]
        add(goal, value, value is not None and value >= 0.85, f"{value or 0:.2f}x", why)

    for loop in SPEED:
        goal = f"stage 22 memory per held connection on {loop} ≤ 6 KiB per process, 1000 held (RSS)"
        worst, shown, why = held_memory(report, SPEED[loop], absent(SPEED[loop]))
        add(goal, worst, worst is not None and worst <= 6, shown, why)
    return out


COLORS = ("#6b7280", "#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#be185d")


def svg_chart(report: Record) -> str:
    """Small multiples: one panel per figure, one bar per path (stdlib only, no plotting library)."""
    paths = [p["label"] for p in report["paths"] if p["available"]]
    summary = report["summary"]
    panels: list[tuple[str, list[tuple[str, float]]]] = []
    for key, title in (
        ("bulk_up.mb_per_s", "Bulk upload, MB/s (higher is better)"),
        ("bulk_down.mb_per_s", "Bulk download, MB/s (higher is better)"),
        ("ab.rps", "New connection per request, req/s (higher is better)"),
        ("wrk.rps", "Keep-alive, req/s (higher is better)"),
        ("wrk.p99_ms", "Keep-alive p99 latency, ms (lower is better)"),
        ("ttfb.p50_ms", "Time to first byte, median ms (lower is better)"),
        ("ttfb_slow.p50_ms", "Time to first byte over a 25 ms link, median ms (lower is better)"),
        ("fairness.busy_p99_ms", "Small requests' p99 beside a slow download, ms (lower is better)"),
    ):
        if key in summary:
            panels.append((title, [(p, summary[key][p]["median"]) for p in paths if p in summary[key]]))
    memory = [
        (key.split(" ", 1)[1], paths_[p]["median"])
        for key, paths_ in sorted(summary.items())
        if key.startswith("idle.pss_kib_per_conn ")
        for p in paths_
    ]
    if memory:
        # PSS, not RSS: socat's forked children share most pages, which RSS counts once per child.
        panels.append(("Memory per held connection, PSS KiB per process (lower is better)", memory))
    width, label_w, bar_w, row_h, title_h, gap = 760, 170, 480, 20, 24, 14
    height = sum(title_h + row_h * len(rows) + gap for _, rows in panels) + 10
    color = {p: COLORS[i % len(COLORS)] for i, p in enumerate(paths)}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'style="width:100%;max-width:{width}px;height:auto" font-family="sans-serif" font-size="12" role="img">',
        f"<title>Benchmark results, {html.escape(report['machine']['date'])}</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    y = 8
    for title, rows in panels:
        out.append(f'<text x="4" y="{y + 15}" font-weight="bold" fill="#111827">{html.escape(title)}</text>')
        y += title_h
        top = max((v for _, v in rows), default=0) or 1
        for name, value in rows:
            owner = max((p for p in paths if name.startswith(p)), key=len, default="")
            fill = color.get(owner, COLORS[0])
            length = max(1.0, value / top * bar_w)
            out.append(
                f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" fill="#374151">{html.escape(name)}</text>'
            )
            out.append(f'<rect x="{label_w}" y="{y + 3}" width="{length:.1f}" height="{row_h - 6}" fill="{fill}"/>')
            out.append(f'<text x="{label_w + length + 5:.1f}" y="{y + 14}" fill="#111827">{_fmt(value)}</text>')
            y += row_h
        y += gap
    out.append("</svg>")
    return "\n".join(out) + "\n"
