"""MkDocs hook: stage pages from the stage READMEs, stage diffs and highlighted lines made at build time.

- Each `stage_N/README.md` is the one source of its stage: GitHub shows it as it is, and this hook
  turns it into the site page `stage-N.md` (`File.generated`). On the way it drops the parts marked
  `<!-- github-only -->` ... `<!-- /github-only -->`, inserts `docs/includes/stage-N-code.md` (the
  code listings, included from the real files by pymdownx.snippets) where the README says
  `<!-- site: code -->`, inserts the diff from the previous stage where it says `<!-- site: diff -->`,
  turns GitHub alerts (`> [!NOTE]`) into admonitions and maps README links to site pages.
- The diff is `difflib.unified_diff` of the two stage folders, computed on every build, so "what
  changed" can never drift from the code. It is kept out of the search index (`data-search-exclude`).
- Code listings come from the real files, by symbol, so stage files carry no snippet markers and a
  listing shows the file's own line numbers. A fence whose whole body is one snippet line:

      ```python title="stage_1/client.py: Client.ping()"
      --8<-- "stage_1/client.py#Client.ping"
      ```

  `path#Name` or `path#Class.method` (any depth of classes and defs) shows exactly that def or
  class: its decorators and the comment lines directly above it (no blank line between) included,
  through its last line. `path#CONSTANT` shows a module-level (or `#Class.NAME` a class-level)
  assignment the same way. `path#A..B` shows everything from the start of A to the end of B (several
  small classes or functions in a row: `#Ping..encode`). `path` or `path#` shows the whole file.
  Optional fence attributes narrow a listing: `from="text"` starts it at the first line containing
  text, `to="text"` ends it at the first line after that containing text (both searched inside the
  symbol, or the whole file); a text may span consecutive lines with `\n` between their parts
  (`from="try:\nproxy_reader"`: the first `try:` line whose next line has `proxy_reader`). The hook
  writes `linenums="<first line>"` (an excerpt always; a whole file if the fence asks for linenums)
  and hands pymdownx.snippets the line range (`path:first:last`, dedented: a method's excerpt starts
  at column 0). A file, symbol or text that does not exist fails the build (PluginError), and so
  does a file that still has `--8<--` section markers. Fences without `#`, from= or to= that name a
  non-Python file or `path:section` are left to pymdownx.snippets as they are (docs outside the
  stages still use sections).
- A listing may also say `highlight="text|other text"`: every line of the listing that contains one
  of the texts is highlighted (`hl_lines`, counted from the listing's first line as pymdownx
  expects, whatever its linenums; write highlight='...' for texts with double quotes), and a text
  that matches no line fails the build, so the highlights follow the code as it changes instead of
  pointing at stale line numbers.
"""

from __future__ import annotations

import ast
import difflib
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from pymdownx.snippets import SnippetPreprocessor

ROOT = Path(__file__).resolve().parents[2]  # docs/hooks/stages.py -> the repository root
# Every stage_N folder there is, in order: a new stage gets its page by existing.
STAGES = sorted(int(p.name.removeprefix("stage_")) for p in ROOT.glob("stage_*") if re.fullmatch(r"stage_\d+", p.name))

GITHUB_ONLY = re.compile(r"<!-- github-only -->.*?<!-- /github-only -->\n?", re.S)
SITE_MARKER = re.compile(r"^<!-- site: (code|diff) -->$", re.M)
ALERT = re.compile(r"^> \[!(NOTE|TIP|IMPORTANT|WARNING|CAUTION)\][ \t]*\n((?:>.*(?:\n|$))*)", re.M)
ALERT_KINDS = {"NOTE": "note", "TIP": "tip", "IMPORTANT": "info", "WARNING": "warning", "CAUTION": "danger"}
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
# A fence whose whole body is one snippet line, e.g. ```python title="x" highlight="a|b" / --8<-- "f.py" / ```
SNIPPET_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<info>[^\n`]*)\n"
    r'(?P=indent)--8<-- "(?P<spec>[^"]+)"\n'
    r"(?P=indent)(?P=fence)[ \t]*$",
    re.M,
)
HIGHLIGHT = re.compile(r"""\bhighlight=(?:"([^"]*)"|'([^']*)')""")
FROM_TO = re.compile(r"""[ \t]+(?P<key>from|to)=(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)')""")
LINENUMS = re.compile(r"""[ \t]*\blinenums=(?:"[^"]*"|'[^']*'|\S+)""")
MESSAGES = re.compile(r"^<!-- messages: (stage_\d+) -->$", re.M)


def on_config(config: Any) -> Any:
    """Resolve snippet paths from the repository root, whatever directory mkdocs runs in, and have
    `mkdocs serve` watch every stage folder (mkdocs.yml's `watch:` cannot glob, and names a folder
    that does not exist as an error)."""
    config.mdx_configs.setdefault("pymdownx.snippets", {})["base_path"] = [str(ROOT)]
    watched = {str(Path(path).resolve()) for path in config.watch}
    config.watch.extend(str(ROOT / f"stage_{n}") for n in STAGES if str(ROOT / f"stage_{n}") not in watched)
    return config


def on_files(files: Files, config: Any) -> Files:
    """Add one generated page per stage README."""
    for n in STAGES:
        readme = ROOT / f"stage_{n}" / "README.md"
        if readme.is_file():
            files.append(File.generated(config, f"stage-{n}.md", content=stage_page(n, readme.read_text())))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Expand `<!-- messages: stage_N -->` and turn `highlight="..."` on snippet fences into `hl_lines`."""
    markdown = MESSAGES.sub(lambda m: message_table(m[1], page.file.src_uri), markdown)
    return SNIPPET_FENCE.sub(lambda m: expand_fence(m, page.file.src_uri), markdown)


# --- stage pages -------------------------------------------------------------------------------


def stage_page(n: int, readme: str) -> str:
    """The site version of stage_N/README.md."""
    text = GITHUB_ONLY.sub("", readme)

    def site_part(match: re.Match[str]) -> str:
        if match[1] == "code":
            include = ROOT / "docs" / "includes" / f"stage-{n}-code.md"
            if not include.is_file():
                raise PluginError(f"stage_{n}/README.md asks for the code listings, but {include.name} is missing")
            return include.read_text()
        if n == STAGES[0]:
            raise PluginError(f"stage_{n}/README.md asks for a diff, but stage {n} has no previous stage")
        return stage_diff(STAGES[STAGES.index(n) - 1], n)

    text = ALERT.sub(admonition, text)
    # Links first: they are written for GitHub; the inserted parts are written for the site.
    text = LINK.sub(lambda m: m[1] + site_link(n, m[2]) + m[3], text)
    return SITE_MARKER.sub(site_part, text)


def admonition(match: re.Match[str]) -> str:
    """`> [!TIP]` + quoted lines (GitHub's alert) -> `!!! tip` + indented lines (an admonition)."""
    body = [re.sub(r"^> ?", "", line) for line in match[2].splitlines()]
    return f"!!! {ALERT_KINDS[match[1]]}\n\n" + "".join(f"    {line}\n" if line else "\n" for line in body) + "\n"


def site_link(n: int, target: str) -> str:
    """Map a link written for GitHub (relative to stage_N/) to the site; leave absolute ones alone."""
    if re.match(r"^(?:[a-z][a-z0-9+.-]*:|#)", target):
        return target  # https:, mailto:, an anchor on this page
    path, _, fragment = target.partition("#")
    anchor = f"#{fragment}" if fragment else ""
    if path == "../README.md":
        return "index.md" + anchor
    if m := re.fullmatch(r"\.\./docs/(.+)", path):
        return m[1] + anchor
    if m := re.fullmatch(r"\.\./stage_(\d+)/(?:README\.md)?", path):
        return f"stage-{m[1]}.md{anchor}"
    if m := re.fullmatch(r"(?:\.\./stage_(\d+)/)?(\w+\.py)", path):
        # A stage file: its listing on that stage's page (the heading ids in docs/includes/).
        return f"stage-{m[1] or n}.md#{code_anchor(m[2])}"
    raise PluginError(f"stage_{n}/README.md links to {target!r}, which has no page on the site; link a stage or docs/")


def code_anchor(name: str) -> str:
    """The id of a file's listing heading: relay.py -> relay-py, __init__.py -> init-py."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def stage_diff(m: int, n: int) -> str:
    """Markdown for 'what changed' from stage m to stage n: a summary table and one unified diff per changed file."""
    old_dir, new_dir = ROOT / f"stage_{m}", ROOT / f"stage_{n}"
    names = sorted({p.name for p in old_dir.glob("*.py")} | {p.name for p in new_dir.glob("*.py")})
    rows, blocks = [], []
    for name in names:
        old = read_lines(old_dir / name)
        new = read_lines(new_dir / name)
        if old == new:
            rows.append(f"| `{name}` | unchanged |")
            continue
        diff = list(difflib.unified_diff(old, new, f"stage_{m}/{name}", f"stage_{n}/{name}"))
        added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
        removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
        if not old:
            summary, opener = f"new file, {len(new)} lines", "???"  # new files are listed in full above
        elif not new:
            summary, opener = f"removed ({len(old)} lines)", "???"
        else:
            summary, opener = f"{added} lines added, {removed} removed", "???+"
        rows.append(f"| `{name}` | {summary} |")
        body = "".join(f"    {line}" if line.endswith("\n") else f"    {line}\n" for line in diff)
        # The name as code: a bare `__init__.py` in a title is Markdown for bold "init.py".
        blocks.append(f'{opener} abstract "`{name}`: {summary}"\n\n    ````diff\n{body}    ````\n')
    table = "| file | change |\n| --- | --- |\n" + "\n".join(rows) + "\n"
    intro = f"Generated from the code when this site was built: `diff -u stage_{m}/FILE stage_{n}/FILE`.\n\n"
    # Out of the search index: a search for "half-close" should find the pages that teach it, not
    # every diff line that mentions it. Material's search skips an element marked
    # data-search-exclude until an element *of the same tag* closes, so the wrapper is a <section>:
    # a <div> would end the exclusion at the first inner </div>.
    return (
        '<section class="stage-diff" data-search-exclude="" markdown>\n\n'
        + intro
        + table
        + "\n"
        + "\n".join(blocks)
        + "\n</section>\n"
    )


def read_lines(path: Path) -> list[str]:
    """A file's lines with their newlines, or no lines if it does not exist."""
    return path.read_text().splitlines(keepends=True) if path.is_file() else []


# --- message tables --------------------------------------------------------------------------


def message_table(stage: str, page: str) -> str:
    """A table of a stage's messages, read from the docstrings of the dataclasses in its protocol.py.

    Each docstring reads "<who> -> <whom>[ on <connection>], <when>: `<the line>`", so the
    reference page shows exactly what the code says, and a new message appears by itself.
    """
    source = ROOT / stage / "protocol.py"
    if not source.is_file():
        raise PluginError(f"{page}: {stage}/protocol.py does not exist")
    rows = []
    for node in ast.parse(source.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or ("->" not in doc and not doc.startswith("Either way")):
            continue  # errors and helpers, not messages
        summary, sep, wire = doc.split("\n")[0].partition(": `")
        if not sep:
            raise PluginError(f"{stage}/protocol.py: {node.name}'s docstring does not end with the wire form")
        who, _, when = summary.partition(", ")
        rows.append(f"| `{wire.rstrip('.')} | {who.replace('->', '→')} | {when} | `{node.name}` |")
    if not rows:
        raise PluginError(f"{page}: no messages found in {stage}/protocol.py")
    head = "| line on the wire | sent | when | in the code |\n| --- | --- | --- | --- |\n"
    return head + "\n".join(rows) + f"\n\n<small>Generated from the docstrings in `{stage}/protocol.py`.</small>\n"


# --- code listings: includes by symbol, highlighted lines -----------------------------------------


def expand_fence(match: re.Match[str], page: str) -> str:
    """Turn an include by symbol into pymdownx's line range, with real line numbers and hl_lines."""
    info, spec = match["info"], match["spec"]
    path, hash_, symbol = spec.partition("#")
    bounds = {m["key"]: m["dq"] if m["dq"] is not None else m["sq"] for m in FROM_TO.finditer(info)}
    if not hash_ and not bounds and (":" in spec or not path.endswith(".py")):
        # pymdownx's own forms (a file outside the stages, "path:section", "path:10:20"): as they are.
        return highlight_fence(match["indent"], match["fence"], info, spec, included_lines(spec, page), page)
    file = ROOT / path
    if not file.is_file():
        raise PluginError(f"{page}: {path} does not exist (in {spec!r})")
    lines = file.read_text().splitlines()
    marker = SnippetPreprocessor.RE_SNIPPET_SECTION
    if any("8<-" in line and marker.match(line) for line in lines):
        raise PluginError(f"{page}: {path} has `--8<--` section markers: delete them, include by symbol ({spec!r})")
    first, last = symbol_lines(file, lines, symbol, page, spec) if symbol else (1, len(lines))
    first, last = narrow(lines, first, last, bounds, page, spec)
    info = FROM_TO.sub("", info)
    if symbol or bounds or LINENUMS.search(info):
        # Always the file's own numbers: an excerpt starts at its first line, a whole file at 1.
        info = LINENUMS.sub("", info).rstrip() + f' linenums="{first}"'
    spec = f"{path}:{first}:{last}" if (first, last) != (1, len(lines)) else path
    return highlight_fence(match["indent"], match["fence"], info, spec, lines[first - 1 : last], page)


def symbol_lines(file: Path, lines: list[str], symbol: str, page: str, spec: str) -> tuple[int, int]:
    """First and last line (1-based) of a symbol, or of a range of them ("A..B": from A to B)."""
    if file.suffix != ".py":
        raise PluginError(f"{page}: {spec!r} names a symbol, but only Python files have symbols")
    tree = ast.parse("\n".join(lines) + "\n", str(file))
    start, _, end = symbol.partition("..")
    first, last = find_symbol(tree, lines, start, page, spec)
    if end:
        end_first, last = find_symbol(tree, lines, end, page, spec)
        if end_first < first:
            raise PluginError(f"{page}: {spec!r}: {end} comes before {start} in {file.relative_to(ROOT)}")
    return first, last


def find_symbol(tree: ast.Module, lines: list[str], symbol: str, page: str, spec: str) -> tuple[int, int]:
    """First and last line (1-based) of a def, class or assigned name, with its decorators and the
    comment lines directly above it."""
    body: list[ast.stmt] = tree.body
    node: ast.stmt | None = None
    parts = symbol.split(".")
    for i, part in enumerate(parts):
        found = [n for n in body if part in defined_names(n, last=i == len(parts) - 1)]
        if not found:
            where = ".".join(parts[:i]) or "the module"
            raise PluginError(f"{page}: {spec!r}: {part!r} is not defined in {where}")
        if len(found) > 1:
            raise PluginError(f"{page}: {spec!r}: {part!r} is defined {len(found)} times; name another symbol")
        node = found[0]
        body = node.body if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else []
    assert node is not None and node.end_lineno is not None
    decorators = getattr(node, "decorator_list", [])
    first = min([node.lineno] + [d.lineno for d in decorators])
    while first > 1 and lines[first - 2].lstrip().startswith("#"):
        first -= 1
    return first, node.end_lineno


def defined_names(node: ast.stmt, last: bool) -> set[str]:
    """The names a statement defines: a def or class; on the last part of a symbol, also assignments."""
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return {node.name}
    if not last:
        return set()
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    if type(node).__name__ == "TypeAlias":  # `type X = ...` (Python 3.12+)
        return {node.name.id}  # type: ignore[attr-defined]
    return set()


def narrow(lines: list[str], first: int, last: int, bounds: dict[str, str], page: str, spec: str) -> tuple[int, int]:
    """Narrow [first, last] to from="..." through the first following line with to="..."."""
    if "from" in bounds:
        first = find_text(lines, first, last, bounds["from"], page, spec, "from")
    if "to" in bounds:
        start = first + 1 if "from" in bounds else first
        last = find_text(lines, start, last, bounds["to"], page, spec, "to")
        last += bounds["to"].count("\\n")  # a text over several lines ends on its last line
    return first, last


def find_text(lines: list[str], first: int, last: int, text: str, page: str, spec: str, key: str) -> int:
    """The first line in [first, last] that contains text (`\\n` in text: the next line goes on with it)."""
    parts = text.split("\\n")
    for n in range(first, last - len(parts) + 2):
        if all(part in lines[n - 1 + k] for k, part in enumerate(parts)):
            return n
    where = " after its from= line" if key == "to" else ""
    raise PluginError(f"{page}: {key}={text!r} matches no line of {spec!r}{where}")


def highlight_fence(indent: str, fence: str, info: str, spec: str, lines: list[str], page: str) -> str:
    """The fence for pymdownx; highlight="a|b" becomes hl_lines naming every listed line with a or b."""
    wanted = HIGHLIGHT.search(info)
    if wanted is not None:
        numbers = []
        for text in (wanted[1] if wanted[1] is not None else wanted[2]).split("|"):
            found = [i for i, line in enumerate(lines, start=1) if text in line]
            if not found:
                raise PluginError(f"{page}: highlight {text!r} matches no line of {spec}")
            numbers += found
        # Numbered from the listing's first line, whatever linenums says: what pymdownx expects.
        hl = " ".join(str(i) for i in sorted(set(numbers)))
        info = HIGHLIGHT.sub(f'hl_lines="{hl}"', info)
    return f'{indent}{fence}{info}\n{indent}--8<-- "{spec}"\n{indent}{fence}'


def included_lines(spec: str, page: str) -> list[str]:
    """The lines pymdownx.snippets will include for "path" or "path:section" (marker lines dropped)."""
    path, _, section = spec.partition(":")
    file = ROOT / path
    if not file.is_file():
        raise PluginError(f"{page}: {path} does not exist")
    lines = file.read_text().splitlines()
    marker = SnippetPreprocessor.RE_SNIPPET_SECTION
    if not section:
        return [line for line in lines if not ("8<-" in line and marker.match(line))]
    inside, picked = False, []
    for line in lines:
        m = marker.match(line) if "8<-" in line else None
        if m and m["name"] == section:
            inside = m["type"] == "start"
        elif inside and not m:
            picked.append(line)
    if not picked:
        raise PluginError(f"{page}: section {section!r} not found in {path}")
    return picked
