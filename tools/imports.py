"""The structure lint: what a stage's modules may import.

    python3 -m tools.imports             every stage_<number> folder
    python3 -m tools.imports stage_13     some of them

One line per problem, exit status 1 when there is one:

- an import cycle between a stage's own modules (`mux -> relay -> mux`). Imports under
  `if TYPE_CHECKING:` count: hiding a cycle from the interpreter does not take it out of the design,
  and a reader still has to hold both modules in mind at once;
- a client-side module importing a server-side one (the client would load the whole server), or a
  shared module importing either side (a side-specific import through the back door);
- an import from another stage (a learner copies one folder, and it must run on its own), also of
  the stage itself by its absolute name (a renamed copy would break);
- a third-party import: stage code is the standard library only. The one exception (DESIGN.md) is
  uvloop, and only inside a `try:` that catches ImportError, so the stage runs without it.

The sides of every module name are decided here, in SIDES, and nowhere else. `__main__` (the demo
on one machine) runs both ends, so it may import anything. A module this table doesn't know is
a problem too: a new module is placed on a side by the person who adds it.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import re
import sys
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = re.compile(r"stage_(\d+)")

SERVER, CLIENT, SHARED, DEMO = "server-side", "client-side", "shared", "demo"
# Where each module of every stage belongs (by its name, the same in every stage), read from stage_22.
SIDES = {
    # The server: it accepts clients and users, routes users to tunnels, and owns the public ports.
    "server": SERVER,
    "pairing": SERVER,  # stages 2-3: pairs a user's connection with the client's proxy connection
    "session": SERVER,  # the server's record of a client: resume window, GO_AWAY
    "tunnels": SERVER,  # the tunnel registry and each tunnel's public listener
    "routing": SERVER,  # Host-header routing of users to tunnels
    "forwarding": SERVER,  # stage 20: every request routed, guarded and given X-Forwarded-* on its way
    "passthrough": SERVER,  # the TLS port: a user's ClientHello names its TLS tunnel (stage 21 on)
    "limits": SERVER,  # descriptor slots and listeners: only the server, routing and tunnels use them
    # The client: it dials the server and the local app, and shows what passes through.
    "client": CLIENT,
    "private": CLIENT,  # the private connection to the local app
    "backoff": CLIENT,  # reconnect delays
    "capture": CLIENT,  # keeps the observed exchanges
    "inspector": CLIENT,  # the inspector's web page, on the client's machine
    # Shared by both ends (or by neither): they may import only each other.
    "__init__": SHARED,
    "protocol": SHARED,  # the wire format
    "frames": SHARED,
    "mux": SHARED,
    "relay": SHARED,
    "observe": SHARED,  # HTTP/1.1 framing, sans I/O: the client's inspector; from stage 20 the server's heads
    "pages": SHARED,  # the error pages (the client's 502 in stage 3, the server's from then on)
    "cli": SHARED,  # argument parsing helpers of both command lines
    "loops": SHARED,  # the event loop both command lines run on (--loop: uvloop or asyncio)
    "auth": SHARED,  # both ends of the HMAC challenge
    "budget": SHARED,
    "sni": SHARED,  # the ClientHello's server name, sans I/O: the server routes by it, the inspector shows it
    "tls": SHARED,  # both ends' TLS contexts
    "certs": SHARED,  # test certificates for the demo
    "demo_app": SHARED,  # the local app of the demo
    # The demo on one machine runs a server and a client: both sides.
    "__main__": DEMO,
}
# What each side may import from its own stage.
ALLOWED = {
    SERVER: {SERVER, SHARED},
    CLIENT: {CLIENT, SHARED},
    SHARED: {SHARED},
    DEMO: {SERVER, CLIENT, SHARED, DEMO},
}
GUARDED_THIRD_PARTY = frozenset({"uvloop"})  # allowed only inside `try: ... except ImportError:`


@dataclass
class Module:
    name: str  # "mux", or "sub.mod" for a module in a subfolder
    path: str  # relative to the root: "stage_13/mux.py"
    imports: dict[str, int] = field(default_factory=dict)  # module of the same stage -> first line importing it


def stages(root: Path) -> list[str]:
    found = [p.name for p in root.iterdir() if p.is_dir() and STAGE.fullmatch(p.name)]
    return sorted(found, key=lambda name: int(name.removeprefix("stage_")))


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught] if caught else []
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, anywhere in the module, and whether a `try` guards it against ImportError."""

    def walk(node: ast.AST, guarded: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, guarded
        if isinstance(node, ast.Try | ast.TryStar):
            guards = guarded or any(catches_import_error(h) for h in node.handlers)
            for statement in node.body:
                yield from walk(statement, guards)
            others: list[ast.AST] = [*node.handlers, *node.orelse, *node.finalbody]
            for other in others:
                yield from walk(other, guarded)
            return
        for child in ast.iter_child_nodes(node):
            yield from walk(child, guarded)

    yield from walk(tree, False)


def resolve(dotted: str, names: Container[str]) -> str | None:
    """The stage's module that `dotted` names: a file, or a subfolder's __init__."""
    for candidate in (dotted, f"{dotted}.__init__"):
        if candidate in names:
            return candidate
    return None


def read_modules(root: Path, stage: str, problems: list[str]) -> dict[str, Module]:
    folder = root / stage
    files = sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
    names = {".".join(p.relative_to(folder).with_suffix("").parts): p for p in files}
    modules: dict[str, Module] = {}
    for name, file in names.items():
        where = file.relative_to(root).as_posix()
        module = modules[name] = Module(name, where)
        try:
            tree = ast.parse(file.read_bytes(), filename=where)
        except SyntaxError as error:
            problems.append(f"{where}:{error.lineno}: does not parse: {error.msg}")
            continue
        package = name.split(".")[:-1]  # "mux" -> [], "sub.mod" -> ["sub"], "sub.__init__" -> ["sub"]
        for node, guarded in imports(tree):
            at = f"{where}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level - 1 > len(package):
                    problems.append(f"{at}: imports from outside its stage ({'.' * node.level}{node.module or ''})")
                    continue
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    targets = [".".join([*base, node.module])]
                else:  # `from . import x`: x is a module of the stage, or a name from the package's __init__
                    targets = [".".join([*base, alias.name]) for alias in node.names]
                    targets = [t if resolve(t, names) else ".".join([*base, "__init__"]) for t in targets]
                for target in targets:
                    found = resolve(target, names)
                    if found and found != name:
                        module.imports.setdefault(found, node.lineno)
                continue
            tops = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for top in (t.partition(".")[0] for t in tops):
                if STAGE.fullmatch(top):
                    whose = "its own stage by name (use a relative import)" if top == stage else f"another stage, {top}"
                    problems.append(f"{at}: imports {whose}: a copied stage folder must run on its own")
                elif top in sys.stdlib_module_names or (top in GUARDED_THIRD_PARTY and guarded):
                    continue
                elif top in GUARDED_THIRD_PARTY:
                    problems.append(f"{at}: imports {top} unguarded: only inside `try:` ... `except ImportError:`")
                else:
                    problems.append(f"{at}: imports {top}, not in the standard library: stage code is stdlib only")
    return modules


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Every elementary cycle, each starting at its smallest module name, in order."""
    found: list[list[str]] = []

    def extend(path: list[str]) -> None:
        for nxt in sorted(modules[path[-1]].imports):
            if nxt == path[0]:
                found.append([*path, nxt])
            elif nxt > path[0] and nxt not in path:
                extend([*path, nxt])

    for start in sorted(modules):
        extend([start])
    return found


def check_stage(root: Path, stage: str) -> list[str]:
    problems: list[str] = []
    modules = read_modules(root, stage, problems)
    for module in modules.values():
        side = SIDES.get(module.name.rpartition(".")[2])
        if side is None:
            problems.append(
                f"{module.path}: {module.name} is on no side yet: add it to SIDES in tools/imports.py "
                "(server-side, client-side or shared)"
            )
            continue
        for target, line in sorted(module.imports.items()):
            other = SIDES.get(target.rpartition(".")[2])
            if other is not None and other not in ALLOWED[side]:
                why = " (the client would load the server)" if (side, other) == (CLIENT, SERVER) else ""
                problems.append(f"{module.path}:{line}: {side} {module.name} imports {other} {target}{why}")
    for cycle in cycles(modules):
        lines = ", ".join(f"{a}.py:{modules[a].imports[b]}" for a, b in itertools.pairwise(cycle))
        problems.append(f"{stage}: import cycle {' -> '.join(cycle)} ({lines})")
    return problems


def check(root: Path, names: Sequence[str] | None = None) -> list[str]:
    problems = []
    for stage in names or stages(root):
        problems += check_stage(root, stage)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.imports",
        description="The structure lint: no import cycles, the client never imports the server, stdlib only.",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    parser.add_argument("stages", nargs="*", metavar="STAGE", help="stage folders to check (default: all)")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    names = [s if s.startswith("stage_") else f"stage_{s}" for s in args.stages]
    if missing := [s for s in names if not (root / s).is_dir()]:
        parser.error(f"no such stage: {', '.join(missing)}")
    problems = check(root, names)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        checked = names or stages(root)
        print(f"imports: {len(checked)} stages: no import cycle, no client module imports the server, stdlib only")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
