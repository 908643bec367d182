"""Maintainer tools for the stage ladder (not stage code: a learner never needs them).

- `python3 -m tools.ladder`: a fix is written once, then carried to every later stage.
- `python3 -m tools.imports`: the structure lint (no import cycles, the client never loads the server).
"""
