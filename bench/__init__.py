"""Reproducible benchmarks: direct vs socat vs stage 0 vs the stage 3, 8, 13 and 16 tunnels (`python3 -m bench`).

Layout: `origin.py` (the server every path leads to), `paths.py` (the paths under
test as real processes), `scenarios.py` (the load), `report.py` (medians, ratios,
goals and the Markdown/JSON/SVG reports), `__main__.py` (the interleaved run).
"""
