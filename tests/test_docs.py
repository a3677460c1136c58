"""Every code block in docs/*.md runs, prints what it says, and every documented error is the one the code raises.

The rules, for anyone writing a page under docs/:

* Python blocks (a fence whose info string is ``python``) are executed. The blocks of one page run in order in one
  fresh namespace, so a page may define something once (a model, a function) and use it in later blocks; pages never
  share a namespace. Each page runs in a temporary working directory with ``torch.manual_seed(0)`` set first.
* Output: a comment ``# prints: TEXT`` states one line of output. The lines a block prints must be exactly the
  ``# prints:`` texts of that block, in order (a block without such comments must print nothing). Trailing
  whitespace is ignored; nothing else is.
* Foreign code: a Python block whose info string carries one more word naming another library (only ``python nni``
  is known) is shown for comparison and not executed, because that library is not installed. Such a block must start
  with a comment line ``# NNI 3.0``, may appear only on the migration page, and there must be few of them. Any other
  extra word in a Python fence is an error, so a block cannot be skipped by accident.
* Bash blocks are not executed. Each ``quantrain ...`` command must name a real subcommand and options;
  ``python FILE`` and ``torchrun ... FILE`` must name an existing file, and each ``--option`` must appear in it;
  ``python -m MODULE`` must name an importable module.
* Error tables: a Markdown table whose header is ``| config_list | raises | message contains |`` or
  ``| keyword arguments | raises | message contains |`` is executed row by row, after the page's Python blocks, in
  the page's namespace: ``QATQuantizer(make_model(), CONFIG_LIST)`` or
  ``QATQuantizer(make_model(), [{"op_types": ["Linear"]}], **KEYWORD_ARGUMENTS)`` must raise the exception type of
  the second column with the third column's text in its message. Cells are Python literals in backticks.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FOREIGN_TAGS = {"nni": "# NNI 3.0"}
FOREIGN_PAGES = {"migrating_from_nni.md"}
MAX_FOREIGN_BLOCKS = 8
PRINTS = re.compile(r"#\s*prints:\s?(.*)$")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
ERROR_TABLE_KINDS = ("config_list", "keyword arguments")


@dataclass(frozen=True)
class Block:
    page: str
    index: int
    language: str
    tags: tuple[str, ...]
    code: str
    line: int

    @property
    def label(self) -> str:
        return f"docs/{self.page} block {self.index} (line {self.line})"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for index, match in enumerate(FENCE.finditer(text)):
        words = match.group(1).split()
        language = words[0] if words else ""
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page.name, index, language, tuple(words[1:]), match.group(2), line))
    return found


def expected_output(code: str) -> list[str]:
    return [m.group(1).rstrip() for line in code.splitlines() if (m := PRINTS.search(line))]


def test_the_documentation_pages_exist():
    names = {page.name for page in PAGES}
    assert {
        "index.md",
        "concepts.md",
        "config_list.md",
        "migrating_from_nni.md",
        "migrating_from_torch_ao.md",
        "benchmarks.md",
        "performance.md",
    } <= names


def test_fences_are_closed_and_tagged():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fences = [line for line in text.splitlines() if line.startswith("```")]
        assert len(fences) % 2 == 0, f"docs/{page.name}: an unclosed code fence"
        indented = [line for line in text.splitlines() if line.lstrip().startswith("```") and not line.startswith("```")]
        assert not indented, f"docs/{page.name}: an indented fence would escape the test: {indented[0]!r}"
        for block in blocks(page):
            assert block.language in ("python", "bash", "text"), f"{block.label}: fence language {block.language!r}"
            if block.language == "python" and block.tags:
                assert len(block.tags) == 1 and block.tags[0] in FOREIGN_TAGS, f"{block.label}: unknown tags {block.tags}"


def test_foreign_blocks_are_few_and_labelled():
    foreign = [b for page in PAGES for b in blocks(page) if b.language == "python" and b.tags]
    assert 0 < len(foreign) <= MAX_FOREIGN_BLOCKS
    for block in foreign:
        assert block.page in FOREIGN_PAGES, f"{block.label}: foreign code belongs on the migration page only"
        first = block.code.lstrip().splitlines()[0]
        assert first.startswith(FOREIGN_TAGS[block.tags[0]]), f"{block.label}: must start with {FOREIGN_TAGS[block.tags[0]]!r}"
        assert not expected_output(block.code), f"{block.label}: foreign code is not run, so it cannot promise output"
    executed = [b for page in PAGES for b in blocks(page) if b.language == "python" and not b.tags]
    assert len(executed) > 4 * len(foreign)


def _python_pages() -> list[str]:
    return [page.name for page in PAGES if any(b.language == "python" and not b.tags for b in blocks(page))]


def _run_page(name: str) -> dict:
    namespace: dict = {"__name__": f"docs_{Path(name).stem}"}
    for block in blocks(DOCS / name):
        if block.language != "python" or block.tags:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pages show the warnings they mean to show by printing them
            exec(compile(block.code, block.label, "exec"), namespace)
        printed = [line.rstrip() for line in out.getvalue().splitlines()]
        assert printed == expected_output(block.code), f"{block.label}: printed {printed}"
    return namespace


@pytest.mark.parametrize("name", _python_pages())
def test_python_blocks_run_and_print_what_they_say(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = _run_page(name)
    wrong = [
        problem
        for kind, rows in error_tables(DOCS / name)
        for literal, exc_type, message in rows
        if (problem := _check_error_row(namespace, name, kind, literal, exc_type, message))
    ]
    assert not wrong, "\n".join(wrong)


def error_tables(page: Path) -> list[tuple[str, list[tuple[str, str, str]]]]:
    tables = []
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        cells = _cells(line)
        if cells is None or len(cells) != 3 or cells[1:] != ["raises", "message contains"] or cells[0] not in ERROR_TABLE_KINDS:
            continue
        rows = []
        for row in lines[i + 2 :]:
            row_cells = _cells(row)
            if row_cells is None:
                break
            assert len(row_cells) == 3, f"docs/{page.name}: malformed row {row!r}"
            rows.append(tuple(_unquote(cell) for cell in row_cells))
        tables.append((cells[0], rows))
    return tables


def _cells(line: str) -> list[str] | None:
    line = line.strip()
    if not (line.startswith("|") and line.endswith("|")):
        return None
    return [cell.strip() for cell in line[1:-1].split(" | ")]


def _unquote(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


def _check_error_row(namespace: dict, page: str, kind: str, literal: str, exc_type: str, message: str) -> str:
    """Run one row of an error table; an empty string when the code raises what the row says."""
    value = ast.literal_eval(literal)
    quantizer, make_model = namespace["QATQuantizer"], namespace["make_model"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if kind == "config_list":
                quantizer(make_model(), value)
            else:
                quantizer(make_model(), [{"op_types": ["Linear"]}], **value)
        except Exception as exc:
            if type(exc).__name__ == exc_type and message in str(exc):
                return ""
            return f"docs/{page}: {literal} raised {type(exc).__name__}: {exc}"
    return f"docs/{page}: {literal} raised nothing"


def test_error_tables_are_found():
    rows = [row for page in PAGES for _, table in error_tables(page) for row in table]
    assert len(rows) >= 50
    assert len({call for call, _, _ in rows}) == len(rows), "a documented error row is repeated"


def test_every_config_key_is_documented():
    from quantrain.config.parse import ENTRY_KEYS, SETTING_KEYS

    reference = (DOCS / "config_list.md").read_text(encoding="utf-8")
    for key in (*ENTRY_KEYS, *SETTING_KEYS):
        assert f"### `{key}`" in reference, f"docs/config_list.md has no section for {key!r}"
    for option in ("quant_start_step", "activation_start_step", "freeze_bn_step", "freeze_range_step", "weight_range",
                   "fuse", "integer_bias", "sync_ranges", "process_group"):  # fmt: skip
        assert f"`{option}`" in reference, f"docs/config_list.md does not document {option!r}"


# ---- bash blocks -----------------------------------------------------------------------------------------------


def _commands(code: str) -> list[list[str]]:
    commands = []
    for line in code.splitlines():
        for part in re.split(r"&&|;|\|", line.split(" #")[0]):
            words = shlex.split(part.strip())
            if words:
                commands.append(words)
    return commands


def _check_script(path_text: str, options: list[str], label: str) -> None:
    path = ROOT / path_text
    assert path.is_file(), f"{label}: no file {path_text}"
    source = path.read_text(encoding="utf-8")
    for option in options:
        assert f'"{option.split("=")[0]}"' in source, f"{label}: {path_text} has no option {option}"


def _check_command(words: list[str], label: str) -> None:
    program, args = words[0], words[1:]
    if program == "quantrain":
        from quantrain.cli import build_parser

        parser = build_parser()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                parser.parse_args([a for a in args if a != "--help"])
            except SystemExit as exc:
                pytest.fail(f"{label}: `{' '.join(words)}` is not a valid quantrain command ({exc})")
    elif program in ("python", "python3") and args[:1] == ["-m"]:
        module = args[1]
        if module not in ("venv", "pip"):
            assert importlib.util.find_spec(module) is not None, f"{label}: no module {module}"
    elif program in ("python", "python3"):
        script = next(a for a in args if not a.startswith("-"))
        _check_script(script, [a for a in args if a.startswith("--")], label)
    elif program == "torchrun":
        at = next(i for i, a in enumerate(args) if a.endswith(".py"))
        _check_script(args[at], [a for a in args[at + 1 :] if a.startswith("--")], label)


@pytest.mark.parametrize("name", [page.name for page in PAGES])
def test_bash_commands_name_real_files_and_options(name):
    for block in blocks(DOCS / name):
        if block.language == "bash":
            for words in _commands(block.code):
                _check_command(words, block.label)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_links_reach_existing_pages_and_headings():
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            linked = page.parent / target if target else page
            assert linked.exists(), f"docs/{page.name} links to {target}, which does not exist"
            if anchor and linked.suffix == ".md" and linked.parent == DOCS:
                assert anchor in _anchors(linked), f"docs/{page.name} links to {target}#{anchor}: no such heading"


def test_performance_tables_repeat_the_benchmarks_page():
    """docs/benchmarks.md publishes the measured tables (README.md quotes a few numbers, tests/test_readme.py checks
    them); docs/performance.md repeats rows of them, which must not drift, beside its own profile tables."""
    published = {
        line.strip() for line in (DOCS / "benchmarks.md").read_text(encoding="utf-8").splitlines() if line.startswith("|")
    }
    lines = (DOCS / "performance.md").read_text(encoding="utf-8").splitlines()
    rows = [line.strip() for line in lines if line.startswith(("| mlp (", "| resnet (", "| digits ("))]  # measured rows
    assert len(rows) > 20
    missing = [row for row in rows if row not in published]
    assert not missing, f"rows of docs/performance.md that docs/benchmarks.md does not have: {missing}"


def test_the_quickstart_is_under_15_lines():
    text = (ROOT / "docs" / "index.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(quickstart.strip().splitlines()) < 15
