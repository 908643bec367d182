"""A fix is written once: the ladder of stages, recorded step by step, and a tool that carries a change forward.

Every stage folder is a plain copy of the one before it plus one idea. `ladder/stage_N.patch` records
that step: the unified diff of the stage code (every file but README.md) from the stage before to
stage_N. The recorded patches are what lets a change made to one stage reach every later stage:

    python3 -m tools.ladder check        every recorded patch still equals the diff between its stages
    python3 -m tools.ladder forward N    stage_N was edited by hand: merge the change into every later stage
    python3 -m tools.ladder record       re-record every patch (after a change meant for one stage only)

`forward N` needs stage_N as it was before the edit. The stage after it was made from that version and
is untouched, so reversing the recorded step `ladder/stage_<next>.patch` on it gives it back exactly
(the stage before could have been edited too, the one after must not have been, so this is the robust
direction). Then for each later stage k, in order: new stage_k = a three-way merge of stage_k (ours)
with the change from the old to the new stage before it (base and theirs), by `git merge-file`.
A conflict stops the walk at that stage with the usual conflict markers and records nothing.

Stages are the `stage_<number>` folders at the repository root, in numeric order (stage_10 after
stage_9). ladder/README.md tells a maintainer how to use this; tests/test_ladder.py checks both the
repository and the tool.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LADDER = "ladder"
STAGE = re.compile(r"stage_(\d+)")
# Not stage code: the page text lives in README.md, and caches are not the author's.
SKIPPED_FILES = frozenset({"README.md"})
SKIPPED_DIRS = frozenset({"__pycache__"})
CONTEXT = 3  # lines of context around each change, as `diff -u`
NO_NEWLINE = "\\ No newline at end of file\n"
HEADER = "# ladder step {base} -> {target}: written by `python3 -m tools.ladder record`; do not edit by hand\n"
CONFLICT_MARKERS = ("<<<<<<< ", ">>>>>>> ")

Tree = dict[str, str]  # a stage's code: path relative to the stage folder (with "/") -> text


class LadderError(Exception):
    """Something the maintainer must fix first; the message says what, in one line."""


# --- stages on disk ------------------------------------------------------------------------------------


def stages(root: Path) -> list[str]:
    """Every `stage_<number>` folder at the root, in numeric order."""
    found = [p.name for p in root.iterdir() if p.is_dir() and STAGE.fullmatch(p.name)]
    return sorted(found, key=lambda name: int(name.removeprefix("stage_")))


def stage_name(root: Path, given: str) -> str:
    """`7` or `stage_11` -> `stage_11`, if that stage exists."""
    name = given if given.startswith("stage_") else f"stage_{given}"
    if name not in stages(root):
        raise LadderError(f"there is no stage {given!r} (stages: {', '.join(stages(root))})")
    return name


def read_stage(root: Path, name: str) -> Tree:
    """The stage's code: every file but README.md, caches and hidden files (editor leftovers)."""
    folder = root / name
    tree: Tree = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part in SKIPPED_DIRS or part.startswith(".") for part in relative.parts):
            continue
        if not path.is_file() or path.name in SKIPPED_FILES or path.suffix == ".pyc":
            continue
        try:
            tree[relative.as_posix()] = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise LadderError(f"{name}/{relative.as_posix()} is not UTF-8 text: the ladder records text only") from None
    return tree


def write_changes(root: Path, name: str, before: Tree, after: Tree) -> list[str]:
    """Make the stage folder hold `after` (it holds `before`); touch only files that change."""
    changed = []
    for path in sorted(before.keys() | after.keys()):
        if before.get(path) == after.get(path):
            continue
        target = root / name / path
        text = after.get(path)
        if text is None:
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(text.encode("utf-8"))
        changed.append(path)
    return changed


# --- the patch format: a unified diff, as `diff -ruN` writes it (no timestamps) ---------------------------


def split_lines(text: str) -> list[str]:
    """Lines with their "\\n"; the last one may lack it. (str.splitlines also splits on \\f and \\r.)"""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def hunk_range(start: int, stop: int) -> str:
    """The `start,length` of a hunk header, as difflib and diff -u write it."""
    length = stop - start
    first = start + 1 if length else start
    return f"{first}" if length == 1 else f"{first},{length}"


def file_diff(path: str, base: str, target: str, old: str | None, new: str | None) -> list[str]:
    if old == new:
        return []
    out = [
        f"diff -ruN {base}/{path} {target}/{path}\n",
        f"--- {base}/{path}\n" if old is not None else "--- /dev/null\n",
        f"+++ {target}/{path}\n" if new is not None else "+++ /dev/null\n",
    ]
    a, b = split_lines(old or ""), split_lines(new or "")
    # autojunk=False: difflib would otherwise skip frequent lines (blank ones) in files of 200+ lines.
    for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(CONTEXT):
        (_, i1, _, j1, _), (_, _, i2, _, j2) = group[0], group[-1]
        out.append(f"@@ -{hunk_range(i1, i2)} +{hunk_range(j1, j2)} @@\n")
        for tag, a1, a2, b1, b2 in group:
            lines = [" " + line for line in a[a1:a2]] if tag == "equal" else []
            if tag in ("replace", "delete"):
                lines += ["-" + line for line in a[a1:a2]]
            if tag in ("replace", "insert"):
                lines += ["+" + line for line in b[b1:b2]]
            out += [line if line.endswith("\n") else line + "\n" + NO_NEWLINE for line in lines]
    return out


def diff_stages(base: str, old: Tree, target: str, new: Tree) -> str:
    """The recorded form of one step: a header line, then every file's diff in path order."""
    out = [HEADER.format(base=base, target=target)]
    for path in sorted(old.keys() | new.keys()):
        out += file_diff(path, base, target, old.get(path), new.get(path))
    return "".join(out)


@dataclass
class Hunk:
    old_start: int
    old_length: int
    new_start: int
    new_length: int
    lines: list[tuple[str, str]] = field(default_factory=list)  # (" " | "-" | "+", the line)


@dataclass
class FilePatch:
    path: str
    old_exists: bool
    new_exists: bool
    hunks: list[Hunk] = field(default_factory=list)


@dataclass
class Patch:
    base: str
    target: str
    files: list[FilePatch]


HUNK = re.compile(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse_patch(text: str, source: str) -> Patch:
    """Read a patch this module wrote; `source` names it in errors."""
    lines = split_lines(text)
    header = re.fullmatch(r"# ladder step (\S+) -> (\S+):.*\n", lines[0] if lines else "")
    if not header:
        raise LadderError(f"{source}: no '# ladder step' header: re-record it with `python3 -m tools.ladder record`")
    patch = Patch(header[1], header[2], [])
    i = 1
    while i < len(lines):
        line = lines[i]
        if not line.startswith("diff -ruN ") or i + 2 >= len(lines):
            raise LadderError(f"{source}:{i + 1}: expected a 'diff -ruN' line, found {line.rstrip()!r}")
        old_label, new_label = lines[i + 1].rstrip("\n"), lines[i + 2].rstrip("\n")
        old_exists, new_exists = old_label != "--- /dev/null", new_label != "+++ /dev/null"
        label = old_label.removeprefix("--- ") if old_exists else new_label.removeprefix("+++ ")
        current = FilePatch(label.partition("/")[2], old_exists, new_exists)
        patch.files.append(current)
        i += 3
        while i < len(lines) and (match := HUNK.fullmatch(lines[i].rstrip("\n"))):
            old_start, old_length, new_start, new_length = (int(n) if n is not None else 1 for n in match.groups())
            hunk = Hunk(old_start, old_length, new_start, new_length)
            current.hunks.append(hunk)
            i += 1
            old_left, new_left = hunk.old_length, hunk.new_length
            while old_left or new_left:
                if i >= len(lines) or lines[i][:1] not in (" ", "-", "+"):
                    raise LadderError(f"{source}:{i + 1}: the hunk ends early")
                tag, body = lines[i][0], lines[i][1:]
                if i + 1 < len(lines) and lines[i + 1] == NO_NEWLINE:
                    body = body.removesuffix("\n")
                    i += 1
                hunk.lines.append((tag, body))
                old_left -= tag != "+"
                new_left -= tag != "-"
                i += 1
    return patch


class PatchError(Exception):
    """A patch does not apply exactly."""


def apply_patch(tree: Tree, patch: Patch, *, reverse: bool = False) -> Tree:
    """Apply a recorded step (or undo it, with reverse=True) exactly: no fuzz, no offsets."""
    result = dict(tree)
    for file in patch.files:
        had, has = (file.new_exists, file.old_exists) if reverse else (file.old_exists, file.new_exists)
        if had != (file.path in tree):
            raise PatchError(f"{file.path} {'is missing' if had else 'already exists'}")
        lines = split_lines(tree.get(file.path, ""))
        out: list[str] = []
        done = 0
        for hunk in file.hunks:
            start, length = (hunk.new_start, hunk.new_length) if reverse else (hunk.old_start, hunk.old_length)
            drop, add = ("+", "-") if reverse else ("-", "+")
            at = start - 1 if length else start
            expected = [body for tag, body in hunk.lines if tag != add]
            if at < done or lines[at : at + length] != expected:
                raise PatchError(f"{file.path}: the hunk at line {start} does not match")
            out += lines[done:at] + [body for tag, body in hunk.lines if tag != drop]
            done = at + length
        out += lines[done:]
        if has:
            result[file.path] = "".join(out)
        elif out:
            raise PatchError(f"{file.path}: should be empty before it is deleted")
        else:
            result.pop(file.path, None)
    return result


# --- check and record -------------------------------------------------------------------------------------


@dataclass
class Step:
    base: str
    target: str

    @property
    def patch(self) -> str:
        return f"{LADDER}/{self.target}.patch"


def steps(root: Path) -> list[Step]:
    names = stages(root)
    return [Step(base, target) for base, target in itertools.pairwise(names)]


def current_patch(root: Path, step: Step) -> str:
    return diff_stages(step.base, read_stage(root, step.base), step.target, read_stage(root, step.target))


def recorded_patch(root: Path, step: Step) -> str | None:
    path = root / step.patch
    return path.read_text(encoding="utf-8") if path.is_file() else None


def recorded_base(text: str) -> str | None:
    match = re.match(r"# ladder step (\S+) -> ", text)
    return match[1] if match else None


def orphans(root: Path) -> list[str]:
    """Recorded patches that belong to no step (their stage is gone, or is now the first)."""
    targets = {step.target for step in steps(root)}
    folder = root / LADDER
    found = sorted(folder.glob("stage_*.patch")) if folder.is_dir() else []
    return [f"{LADDER}/{p.name}" for p in found if p.stem not in targets]


def check(root: Path) -> list[str]:
    """One line per problem; none when every recorded patch equals the diff between its stages."""
    problems: list[str] = []
    stale: list[Step] = []  # steps whose stages no longer give the recorded diff
    for step in steps(root):
        recorded = recorded_patch(root, step)
        if recorded is None:
            problems.append(
                f"{step.patch} is missing ({step.base} -> {step.target} is a new step?): "
                "record it with `python3 -m tools.ladder record`"
            )
        elif recorded_base(recorded) != step.base:
            problems.append(
                f"{step.patch} was recorded from {recorded_base(recorded)}, but the stage before {step.target} is "
                f"now {step.base} (a stage was added or removed): re-record with `python3 -m tools.ladder record`"
            )
        elif recorded != (now := current_patch(root, step)):
            if substance(parse_patch(recorded, step.patch)) == substance(parse_patch(now, step.patch)):
                problems.append(
                    f"{step.patch} ({step.base} -> {step.target}) only has other context lines now ({step.base} "
                    f"and {step.target} were changed alike): re-record with `python3 -m tools.ladder record`"
                )
            else:
                stale.append(step)
    problems += [
        f"{patch} belongs to no step (its stage is gone or is now the first): `python3 -m tools.ladder record` "
        "deletes it"
        for patch in orphans(root)
    ]
    return diagnose(stale) + problems


def substance(patch: Patch) -> list[tuple[str, bool, bool, list[tuple[str, str]]]]:
    """What a step changes, without its context lines and line numbers."""
    return [
        (f.path, f.old_exists, f.new_exists, [line for hunk in f.hunks for line in hunk.lines if line[0] != " "])
        for f in patch.files
    ]


def diagnose(stale: list[Step]) -> list[str]:
    """Name the stage that looks edited or stale for each step that no longer matches.

    A stage edited on its own breaks two steps in a row, the one into it and the one out of it.
    A step that breaks alone means its two stages disagree about a change: the later one lacks a fix
    made to the earlier one (the earlier stages were edited alike), or the later one was edited
    (and the stages after it alike).
    """
    lines = []
    for i, step in enumerate(stale):
        into = i > 0 and stale[i - 1].target == step.base
        out_of = i + 1 < len(stale) and stale[i + 1].base == step.target
        if out_of:
            number = step.target.removeprefix("stage_")
            nxt = stale[i + 1]
            lines.append(
                f"{step.target} was edited since the ladder was recorded ({step.patch} and {nxt.patch} no longer "
                f"match): carry the change to the later stages with `python3 -m tools.ladder forward {number}`, "
                "or keep it in that stage only with `python3 -m tools.ladder record`"
            )
        elif not into:
            number = step.base.removeprefix("stage_")
            lines.append(
                f"{step.patch} ({step.base} -> {step.target}) no longer matches: either {step.target} is stale, it "
                f"lacks a change made to {step.base} (carry it on with `python3 -m tools.ladder forward {number}`), "
                f"or {step.target} was edited on purpose (keep it with `python3 -m tools.ladder record`)"
            )
    return lines


def record(root: Path) -> list[str]:
    """Re-record every step's patch; say which files changed."""
    (root / LADDER).mkdir(exist_ok=True)
    said = []
    for step in steps(root):
        text = current_patch(root, step)
        old = recorded_patch(root, step)
        if old != text:
            (root / step.patch).write_bytes(text.encode("utf-8"))
            what = "recorded" if old is None else "re-recorded"
            said.append(f"{what} {step.patch} ({step.base} -> {step.target})")
    for patch in orphans(root):
        (root / patch).unlink()
        said.append(f"deleted {patch} (its step is gone)")
    return said


# --- forward: carry a change made to one stage into every later stage ---------------------------------------


@dataclass
class Merged:
    tree: Tree
    conflicts: list[str]  # one line each: the file and what to do
    notes: list[str]  # changes not carried, and why


def merge_file(ours: str, base: str, theirs: str, labels: tuple[str, str, str]) -> tuple[str, int]:
    """`git merge-file`: the merged text and the number of conflicts (left marked in the text)."""
    with tempfile.TemporaryDirectory(prefix="ladder-") as scratch:
        files = []
        for name, text in zip(("ours", "base", "theirs"), (ours, base, theirs), strict=True):
            path = Path(scratch) / name
            path.write_bytes(text.encode("utf-8"))
            files.append(str(path))
        command = ["git", "merge-file", "-p", "-L", labels[0], "-L", labels[1], "-L", labels[2], *files]
        try:
            done = subprocess.run(command, capture_output=True, check=False)
        except FileNotFoundError:
            raise LadderError("`forward` merges with `git merge-file`, and git is not installed") from None
    if not 0 <= done.returncode < 128:
        raise LadderError(f"git merge-file failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode("utf-8"), done.returncode


def merge_stage(name: str, previous: str, ours: Tree, base: Tree, theirs: Tree) -> Merged:
    """Carry the change base -> theirs (the stage before, old and new) into `ours` (stage `name`)."""
    merged = Merged(dict(ours), [], [])
    labels = (name, f"{previous} before the change", previous)
    for path in sorted(base.keys() | theirs.keys() | ours.keys()):
        b, t, o = base.get(path), theirs.get(path), ours.get(path)
        if b == t or t == o:  # the change does not touch this file, or this stage has it already
            continue
        if o == b:  # this stage kept the file as it was: take the change (an edit, a new file, a deletion)
            if t is None:
                del merged.tree[path]
            else:
                merged.tree[path] = t
        elif o is None:  # the change edits a file this stage deleted
            merged.notes.append(f"{name}/{path}: not carried, {name} no longer holds this file")
        elif t is None:
            merged.conflicts.append(
                f"{name}/{path}: deleted in {previous} but changed in {name}: delete it or keep it by hand"
            )
        else:
            text, count = merge_file(o, b or "", t, labels)
            merged.tree[path] = text
            if count:
                merged.conflicts.append(f"{name}/{path}: {count} conflict(s), marked with <<<<<<< and >>>>>>>")
    return merged


def has_markers(tree: Tree) -> list[str]:
    return [
        path
        for path, text in sorted(tree.items())
        if any(line.startswith(CONFLICT_MARKERS) for line in split_lines(text))
    ]


def summary(before: Tree, after: Tree) -> str:
    words = []
    for path in sorted(before.keys() | after.keys()):
        if before.get(path) != after.get(path):
            verb = "added" if path not in before else "deleted" if path not in after else "changed"
            words.append(f"{verb} {path}")
    return ", ".join(words)


def forward(root: Path, given: str, say: list[str]) -> bool:
    """Carry stage `given`'s edit into every later stage; False (and nothing recorded) on a conflict."""
    edited = stage_name(root, given)
    names = stages(root)
    later = names[names.index(edited) + 1 :]
    if not later:
        say.append(f"{edited} is the last stage: nothing to carry the change into")
        say += record(root)
        return True
    nxt = Step(edited, later[0])
    text = recorded_patch(root, nxt)
    if text is None or recorded_base(text) != edited:
        raise LadderError(
            f"{nxt.patch} does not record {edited} -> {nxt.target}, so {edited} before the edit is unknown: "
            "if the ladder itself changed (a stage added or removed), record it first"
        )
    if len(later) > 1:
        after_next = Step(later[0], later[1])
        if recorded_patch(root, after_next) != current_patch(root, after_next):
            raise LadderError(
                f"{nxt.target} changed too ({after_next.patch} no longer matches), so it can't show what "
                f"{edited} was before the edit: carry or record {nxt.target}'s own change first"
            )
    new = read_stage(root, edited)
    if marked := has_markers(new):
        raise LadderError(f"{edited} still has conflict markers in {', '.join(marked)}: resolve them first")
    try:
        old = apply_patch(read_stage(root, nxt.target), parse_patch(text, nxt.patch), reverse=True)
    except PatchError as error:
        raise LadderError(
            f"{nxt.target} no longer matches {nxt.patch} ({error}): was it edited too? "
            f"Only {edited} may differ from the recorded ladder"
        ) from None
    if old == new:
        say.append(f"{edited} has no change since the ladder was recorded: nothing to carry")
        return True
    say.append(f"{edited}: {summary(old, new)}")
    previous = edited
    for name in later:
        ours = read_stage(root, name)
        merged = merge_stage(name, previous, ours, old, new)
        write_changes(root, name, ours, merged.tree)
        say += merged.notes
        what = summary(ours, merged.tree)
        say.append(f"{name}: {what}" if what else f"{name}: unchanged")
        if merged.conflicts:
            say += merged.conflicts
            number = name.removeprefix("stage_")
            say.append(
                f"stopped at {name} with conflicts, recorded nothing: resolve them, then carry {name} on with "
                f"`python3 -m tools.ladder forward {number}` (the later stages are untouched)"
            )
            return False
        old, new, previous = ours, merged.tree, name
    say += record(root)
    return True


# --- command line ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.ladder",
        description="The ladder of stages: check it, carry a fix forward, record it (see ladder/README.md).",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="fail when a stage no longer matches the recorded ladder")
    carry = commands.add_parser("forward", help="merge a hand edit of stage N into every later stage")
    carry.add_argument("stage", metavar="N", help="the stage you edited: 4 or stage_8")
    commands.add_parser("record", help="re-record every step (after a change meant for one stage only)")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    try:
        if args.command == "check":
            problems = check(root)
            for problem in problems:
                print(f"ladder: {problem}", file=sys.stderr)
            if not problems:
                count = len(steps(root))
                print(f"ladder: all {count} steps match their recorded patches ({' -> '.join(stages(root))})")
            return 1 if problems else 0
        if args.command == "record":
            recorded = record(root)
            print("\n".join(f"ladder: {line}" for line in recorded) or "ladder: every patch matches already")
            return 0
        said: list[str] = []
        try:
            ok = forward(root, args.stage, said)
        finally:
            print("\n".join(f"ladder: {line}" for line in said))
        return 0 if ok else 1
    except LadderError as error:
        print(f"ladder: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
