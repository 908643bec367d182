"""MkDocs hook: stage pages from the stage READMEs, stage diffs and highlighted lines made at build time.

- Each `stage_N/README.md` is the one source of its stage: GitHub shows it as it is, and this hook
  turns it into the site page `stage-N.md` (`File.generated`). On the way it drops the parts marked
  `<!-- github-only -->` ... `<!-- /github-only -->`, inserts `docs/includes/stage-N-code.md` (the
  code listings, included from the real files by pymdownx.snippets) where the README says
  `<!-- site: code -->`, inserts the diff from the previous stage where it says `<!-- site: diff -->`,
  turns GitHub alerts (`> [!NOTE]`) into admonitions and maps README links to site pages.
- The diff is `difflib.unified_diff` of the two stage folders, computed on every build, so "what
  changed" can never drift from the code. It is kept out of the search index (`data-search-exclude`).
- A fence that includes a file may say `highlight="text|other text"`: every line containing one of
  the texts is highlighted (`hl_lines`; write highlight='...' for texts with double quotes), and a
  text that matches no line fails the build, so the highlights follow the code as it changes
  instead of pointing at stale line numbers.
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
MESSAGES = re.compile(r"^<!-- messages: (stage_\d) -->$", re.M)


def on_config(config: Any) -> Any:
    """Resolve snippet paths from the repository root, whatever directory mkdocs runs in."""
    config.mdx_configs.setdefault("pymdownx.snippets", {})["base_path"] = [str(ROOT)]
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
    return SNIPPET_FENCE.sub(lambda m: highlight_fence(m, page.file.src_uri), markdown)


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
        if n == 0:
            raise PluginError("stage_0/README.md asks for a diff, but stage 0 has no previous stage")
        return stage_diff(n)

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


def stage_diff(n: int) -> str:
    """Markdown for 'what changed': a summary table and one unified diff per changed file."""
    old_dir, new_dir = ROOT / f"stage_{n - 1}", ROOT / f"stage_{n}"
    names = sorted({p.name for p in old_dir.glob("*.py")} | {p.name for p in new_dir.glob("*.py")})
    rows, blocks = [], []
    for name in names:
        old = read_lines(old_dir / name)
        new = read_lines(new_dir / name)
        if old == new:
            rows.append(f"| `{name}` | unchanged |")
            continue
        diff = list(difflib.unified_diff(old, new, f"stage_{n - 1}/{name}", f"stage_{n}/{name}"))
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
    intro = f"Generated from the code when this site was built: `diff -u stage_{n - 1}/FILE stage_{n}/FILE`.\n\n"
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
        doc = ast.get_docstring(node) if isinstance(node, ast.ClassDef) else None
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


# --- highlighted lines ---------------------------------------------------------------------------


def highlight_fence(match: re.Match[str], page: str) -> str:
    """Replace highlight="a|b" by hl_lines naming every included line that contains a or b."""
    info = match["info"]
    wanted = HIGHLIGHT.search(info)
    if wanted is None:
        return match[0]
    lines = included_lines(match["spec"], page)
    numbers = []
    for text in (wanted[1] if wanted[1] is not None else wanted[2]).split("|"):
        found = [i for i, line in enumerate(lines, start=1) if text in line]
        if not found:
            raise PluginError(f"{page}: highlight {text!r} matches no line of {match['spec']}")
        numbers += found
    hl = " ".join(str(i) for i in sorted(set(numbers)))
    info = HIGHLIGHT.sub(f'hl_lines="{hl}"', info)
    indent, fence = match["indent"], match["fence"]
    return f'{indent}{fence}{info}\n{indent}--8<-- "{match["spec"]}"\n{indent}{fence}'


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
