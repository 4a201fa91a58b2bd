"""The README stays a five-minute read, and the docs' links, commands and module table match the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_MAKE = re.compile(r"\bmake\s+([A-Za-z0-9][\w.-]*)")
_TARGET = re.compile(r"^([A-Za-z0-9][\w.-]*)\s*:(?!=)", re.M)


def markdown_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` (anchors stripped) whose file does not exist; links inside code are not links."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    text = _INLINE_CODE.sub("", text)
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    return broken


def makefile_targets() -> set[str]:
    """The targets the Makefile defines (rules, not variable assignments)."""
    return set(_TARGET.findall((ROOT / "Makefile").read_text(encoding="utf-8")))


def make_commands(text: str) -> set[str]:
    """The `make <target>` targets a markdown text gives, in code blocks and inline code."""
    code = "\n".join(block.group(0) for block in _FENCE.finditer(text))
    code += "\n" + "\n".join(_INLINE_CODE.findall(_FENCE.sub("", text)))
    return set(_MAKE.findall(code))


def test_readme_is_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} and move detail to docs/")


def test_every_relative_link_in_readme_and_docs_points_at_a_file():
    broken = {page.relative_to(ROOT).as_posix(): broken_links(page) for page in markdown_files()}
    assert not {page: links for page, links in broken.items() if links}


def test_every_make_command_in_the_readme_is_a_makefile_target():
    commands = make_commands(README.read_text(encoding="utf-8"))
    assert commands, "the README gives no make command; the two commands are `make run` and `make test`"
    assert not commands - makefile_targets(), f"not Makefile targets: {sorted(commands - makefile_targets())}"


def test_link_check_reports_a_missing_file_and_ignores_urls_anchors_and_code(tmp_path):
    (tmp_path / "there.md").write_text("x", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#part) [gone](missing.md) ![img](gone.png) [web](https://example.org/x.md) [here](#top)\n"
        "`[inline](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == ["missing.md", "gone.png"]


def test_make_commands_are_read_from_code_only():
    text = "To make sure it works:\n```bash\nNUM_PROCESSES=2 make run ROUNDS=2\n```\nthen `make ui` or `make plan`."
    assert make_commands(text) == {"run", "ui", "plan"}


def architecture_module_table() -> set[str]:
    """`subpackage.module` for each row of docs/architecture.md's module table, whose module cells are in
    backticks (a blank subpackage cell continues the row group above it)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules, group = set(), None
    for row in re.findall(r"^\|(.+)\|\s*$", text, re.M):
        cells = [cell.strip() for cell in row.split("|")]
        if len(cells) != 3 or not re.fullmatch(r"`[a-z_]+`", cells[1]):
            continue  # another table, the header or the separator
        group = cells[0].strip("`") or group
        modules.add(f"{group}.{cells[1].strip('`')}")
    return modules


def test_architecture_module_table_lists_every_library_module():
    package = ROOT / "dapo_ops"
    on_disk = {
        ".".join(path.relative_to(package).with_suffix("").parts)
        for path in package.glob("*/*.py") if path.name != "__init__.py"
    }
    assert on_disk, "dapo_ops has no subpackage modules"
    listed = architecture_module_table()
    assert not on_disk - listed, f"modules missing from docs/architecture.md: {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"docs/architecture.md lists modules that do not exist: {sorted(listed - on_disk)}"
