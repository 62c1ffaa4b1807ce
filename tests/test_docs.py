"""README.md and docs/*.md stay true to the repository.

Every relative link and image resolves to a file (and an anchor to a heading of its page), the
README's documentation index lists every page, every Python block parses, and every `cts` and
`make` command the pages show (in shell blocks and inline code) exists. ruff formats the Python
blocks (`make lint`), but skips those that do not parse; this file catches those.
"""

import functools
import re
from pathlib import Path

import pytest
import typer

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}

FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*([\w+-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
# `cts NAME [SUB]` / `make TARGET` where a shell command starts: line start, after a separator,
# `$(`, or an argument (`torchrun ... --no-python cts train_segmenter`).
CTS = re.compile(r"(?:^|[\s;&|(])cts[ \t]+([A-Za-z][\w-]*)(?:[ \t]+([A-Za-z][\w-]*))?", re.M)
MAKE = re.compile(r"(?:^|[\s;&|(])make[ \t]+([A-Za-z][\w-]*)", re.M)
COMMENT = re.compile(r"(?:^|(?<=\s))#.*$", re.M)


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a page: (language, body)."""
    return [(m.group(2).lower(), m.group(3)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The page without its fenced blocks and inline code, where links are links."""
    return INLINE.sub("", FENCE.sub("", text))


def inline_code(text: str) -> list[str]:
    return [m.group(2).strip() for m in INLINE.finditer(FENCE.sub("", text))]


def shell_text(text: str) -> str:
    """Everything a reader may type: shell blocks without comments, and inline code."""
    shell = [COMMENT.sub("", body) for lang, body in blocks(text) if lang in SHELL]
    return "\n".join(shell + inline_code(text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", page.read_text())):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


@functools.cache
def cli_commands() -> dict[str, frozenset[str]]:
    """The CLI's commands, each with its subcommands (empty for a plain command)."""
    from cts.cli import app

    group = typer.main.get_command(app)
    return {
        name: frozenset(getattr(command, "commands", None) or ())
        for name, command in group.commands.items()
    }


@functools.cache
def make_targets() -> frozenset[str]:
    makefile = (REPO / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w-]*)[ \t]*:(?!=)", makefile, re.M))


def test_there_are_pages():
    assert (REPO / "README.md") in PAGES and len(PAGES) > 2


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_and_images_resolve(page: Path):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


def test_readme_indexes_every_docs_page():
    linked = {
        (REPO / target.partition("#")[0]).resolve()
        for target in LINK.findall(prose((REPO / "README.md").read_text()))
    }
    missing = [page_id(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_python_blocks_parse(page: Path):
    for n, (lang, body) in enumerate(blocks(page.read_text())):
        if lang in {"python", "py"}:
            compile(body, f"{page_id(page)} block {n}", "exec")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_cts_commands_exist(page: Path):
    commands = cli_commands()
    unknown = set()
    for name, sub in CTS.findall(shell_text(page.read_text())):
        if name not in commands:
            unknown.add(f"cts {name}")
        elif commands[name] and sub and sub not in commands[name]:
            unknown.add(f"cts {name} {sub}")
    assert not unknown, f"{page_id(page)}: not commands of the CLI: {sorted(unknown)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_make_targets_exist(page: Path):
    unknown = set(MAKE.findall(shell_text(page.read_text()))) - make_targets()
    assert not unknown, f"{page_id(page)}: not targets of the Makefile: {sorted(unknown)}"
