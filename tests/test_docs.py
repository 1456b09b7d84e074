"""The documentation: links and anchors resolve, the README stays a front door, and the
flag reference is what docs/gen_flags.py generates from the configs today."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)[0] * len(m.group(1))
            elif m.group(1).startswith(fence):
                fence = None
            continue
        if fence is None:
            out.append((number, line))
    return out


def _code_spans(line: str) -> list[tuple[int, int]]:
    """Character ranges of inline `code` spans (a run of n backticks closes on n)."""
    spans, i = [], 0
    while (start := line.find("`", i)) != -1:
        n = len(line[start:]) - len(line[start:].lstrip("`"))
        end = line.find("`" * n, start + n)
        while end != -1 and line[end + n : end + n + 1] == "`":
            end = line.find("`" * n, end + n + 1)
        if end == -1:
            break
        spans.append((start, end + n))
        i = end + n
    return spans


def github_slug(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor for a heading (github-slugger): the rendered text, lowercased,
    punctuation other than - and _ dropped, each space -> '-'; repeats get -1, -2, ..."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    base = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
    slug = base
    while slug in seen:
        seen[base] += 1
        slug = f"{base}-{seen[base]}"
    seen[slug] = 0
    return slug


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    return {github_slug(m.group(2), seen) for _, line in _prose_lines(path.read_text()) if (m := _HEADING.match(line))}


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code."""
    found = []
    for number, line in _prose_lines(path.read_text()):
        spans = _code_spans(line)
        for m in _LINK.finditer(line):
            if not any(a <= m.start() < b for a, b in spans):
                found.append((number, m.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    """Every relative link of `path` whose file is missing or whose #anchor is no heading."""
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor:
            if dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif unquote(anchor) not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


# ------------------------------------------------------------------------- the docs


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(path):
    assert path.exists()
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move details to docs/"
    )
    text = "\n".join(lines)
    for command in ("make demo", "make test"):  # CI calls `make test`
        assert command in text
    for page in ("commands", "flags", "formats", "api", "benchmarks", "correctness"):
        assert f"(docs/{page}.md" in text, f"README.md does not link docs/{page}.md"
    assert "(CONTRIBUTING.md" in text


def _gen_flags():
    spec = importlib.util.spec_from_file_location("gen_flags", ROOT / "docs" / "gen_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_reference_is_up_to_date():
    generated = _gen_flags().render()
    assert (ROOT / "docs" / "flags.md").read_text() == generated, (
        "docs/flags.md is out of date: run python docs/gen_flags.py"
    )


def test_flag_reference_lists_the_flags_help_shows():
    from urbanseg.cli import COMMANDS, build_parser

    text = (ROOT / "docs" / "flags.md").read_text()
    sections = dict(re.findall(r"^## urbanseg (\S+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    assert list(sections) == list(COMMANDS)
    for name, body in sections.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        shown = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", out.getvalue()))
        rows = [line.split("|")[1] for line in body.splitlines() if line.startswith("| `")]
        documented = {f for row in rows for f in re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", row)}
        assert documented, name
        assert documented <= shown, f"urbanseg {name}: {sorted(documented - shown)} not in --help"
        assert {f for f in shown if f.startswith("--")} - {"--help"} <= documented, (
            f"urbanseg {name}: flags missing from docs/flags.md"
        )


# ------------------------------------------------------------- the checker itself


def test_slugs_follow_github_rules():
    seen: dict[str, int] = {}
    assert github_slug("`urbanseg prepare`: raw layout -> resized image/label pairs", seen) == (
        "urbanseg-prepare-raw-layout---resized-imagelabel-pairs"
    )
    assert github_slug("Checkpoints (`best.pt`, `last.pt`)", seen) == "checkpoints-bestpt-lastpt"
    assert github_slug("Loading shards: `urbanseg.data`", seen) == "loading-shards-urbansegdata"
    assert github_slug("model_figures.json", seen) == "model_figuresjson"
    assert [github_slug("Notes", seen) for _ in range(3)] == ["notes", "notes-1", "notes-2"]


def test_checker_catches_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Same\n\n## Same\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n\n"
        "[ok](other.md#same-1) [ok](#doc) [ok](https://example.com/x#y) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#same-2) [bad local](#nope)\n"
    )
    problems = broken_links(doc)
    assert len(problems) == 3, problems
    assert "missing.md does not exist" in problems[0]
    assert "#same-2" in problems[1] and "#nope" in problems[2]
