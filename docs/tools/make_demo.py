"""Record a real run of the most complete stage's demo and draw it as an animated SVG: docs/assets/demo.svg.

It runs `python3 -m stage_N` (N: the highest stage with a `__main__.py`) in one "terminal" and a
user's `curl` commands in another, exactly as that stage's page shows, captures what each printed
and when, and draws two terminal windows whose lines appear at the pace they really did (CSS
animation, plays once; the last frame stays).
Run it from the repository root to refresh the picture after the demo's output changes:

    python3 docs/tools/make_demo.py            # in a private network namespace if it can make one
    python3 docs/tools/make_demo.py --here     # in this one (ports 60623-60625 must be free)
"""

from __future__ import annotations

import argparse
import html
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doccommands import ROOT, Command, Terminal, bring_up_loopback

OUTPUT = ROOT / "docs" / "assets" / "demo.svg"
# The most complete stage: the highest number (stage_10 after stage_9) that has a demo.
DEMO_STAGE = max(int(p.parent.name.removeprefix("stage_")) for p in ROOT.glob("stage_[0-9]*/__main__.py"))
DEMO = f"python3 -m stage_{DEMO_STAGE}"
USER_COMMANDS = [
    "curl -s http://hello.localhost:60624/hello",
    "curl -s http://world.localhost:60624/hello/world | grep '<p>You'",
]
PAUSE = 1.2  # seconds "typing" before each of the user's commands, so the picture reads naturally

# Drawing: a monospace grid.
FONT_SIZE = 12.5
LINE_HEIGHT = 17
CHAR_WIDTH = 7.55  # of a 12.5px monospace glyph, near enough for DejaVu/Liberation Mono
WIDTH = 1040
MAX_CHARS = 134
TITLE_BAR = 26
PADDING = 12
GAP = 14


def record() -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """Run the demo and the user's commands; return each terminal's (seconds, line) pairs."""
    start = time.monotonic()
    demo = Terminal(Command(DEMO, 0, on_interrupt=[]))
    if not demo.wait_for("press Ctrl-C to stop", 15):
        demo.interrupt()
        sys.exit("error: the demo did not start:\n" + "\n".join(demo.lines))
    user: list[tuple[float, str]] = []
    for text in USER_COMMANDS:
        time.sleep(PAUSE)
        user.append((time.monotonic() - start, f"$ {text}"))
        term = Terminal(Command(text, 0))
        if term.finish(20) != 0:
            demo.interrupt()
            sys.exit(f"error: `{text}` failed:\n" + "\n".join(term.lines))
        user += [(t - start, line) for t, line in zip(term.times, term.lines, strict=True)]
    time.sleep(PAUSE)
    user.append((time.monotonic() - start, "$ "))
    stop = time.monotonic()
    demo.interrupt()
    # What the demo printed before Ctrl-C; its goodbye lines would only clutter the last frame.
    shown = [(t - start, line) for t, line in zip(demo.times, demo.lines, strict=True) if t < stop]
    return [(0.0, f"$ {DEMO}"), *shown], user


def window(y: float, title: str, lines: list[tuple[float, str]]) -> tuple[list[str], float]:
    """SVG elements for one terminal window at height y; returns them and the window's height."""
    height = TITLE_BAR + PADDING * 2 + LINE_HEIGHT * max(len(lines), 1)
    parts = [
        f'<g transform="translate(0 {y})">',
        f'<rect width="{WIDTH}" height="{height}" rx="8" fill="#1e1e2e"/>',
        f'<path d="M0 8a8 8 0 0 1 8-8h{WIDTH - 16}a8 8 0 0 1 8 8v{TITLE_BAR - 8}h-{WIDTH}z" fill="#313244"/>',
        *(f'<circle cx="{16 + 18 * i}" cy="13" r="5.5" fill="{c}"/>' for i, c in enumerate(DOTS)),
        f'<text x="{WIDTH / 2}" y="17.5" text-anchor="middle" class="title">{html.escape(title)}</text>',
    ]
    for i, (at, line) in enumerate(lines):
        text = line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 1] + "…"
        css = "cmd" if text.startswith("$ ") else "out"
        baseline = TITLE_BAR + PADDING + LINE_HEIGHT * (i + 1) - 4
        parts.append(
            f'<text x="{PADDING}" y="{baseline}" class="{css}" style="animation-delay:{at:.2f}s"'
            f' xml:space="preserve">{html.escape(text)}</text>'
        )
    parts.append("</g>")
    return parts, height


DOTS = ("#f38ba8", "#f9e2af", "#a6e3a1")


def draw(demo: list[tuple[float, str]], user: list[tuple[float, str]]) -> str:
    top, top_height = window(0, f"terminal 1: {DEMO}", demo)
    bottom, bottom_height = window(top_height + GAP, "terminal 2: a user", user)
    height = top_height + GAP + bottom_height
    style = f"""
    text {{ font-family: 'DejaVu Sans Mono', 'Liberation Mono', Menlo, Consolas, monospace;
            font-size: {FONT_SIZE}px; }}
    .title {{ fill: #a6adc8; font-size: 12px; }}
    .out {{ fill: #cdd6f4; }}
    .cmd {{ fill: #a6e3a1; font-weight: bold; }}
    .out, .cmd {{ opacity: 0; animation: appear 0.01s linear forwards; }}
    @keyframes appear {{ to {{ opacity: 1; }} }}
    @media (prefers-reduced-motion: reduce) {{ .out, .cmd {{ animation: none; opacity: 1; }} }}
    """
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}"'
            f' viewBox="0 0 {WIDTH} {height}" role="img">',
            f"<title>{DEMO} in one terminal, curl through the tunnel in another (a real recording)</title>",
            f"<style>{style}</style>",
            *top,
            *bottom,
            "</svg>",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--here", action="store_true", help="run in this network namespace")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="default: %(default)s")
    args = parser.parse_args()
    if not args.here and os.environ.get("DEMO_IN_NETNS") != "1":
        # Re-run this script inside a fresh network namespace: the demo's fixed ports are free there.
        for prefix in (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]):
            env = {**os.environ, "DEMO_IN_NETNS": "1"}
            command = [*prefix, sys.executable, __file__, "--output", str(args.output)]
            if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                sys.exit(subprocess.run(command, env=env).returncode)
        print("no private network namespace here; running in this one", file=sys.stderr)
    if os.environ.get("DEMO_IN_NETNS") == "1":
        bring_up_loopback()
    demo, user = record()
    args.output.write_text(draw(demo, user))
    print(f"wrote {args.output} ({len(demo)} + {len(user)} lines)")


if __name__ == "__main__":
    main()
