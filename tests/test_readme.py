"""The README's commands and code blocks."""

import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_two_pinned_commands_and_ci_runs_the_test_one():
    commands = _blocks("bash")[0].strip().splitlines()
    assert len(commands) == 2
    assert all("torch==2.13.0" in command for command in commands)
    assert commands[0].endswith("quantrain demo") and "pytest" in commands[1]
    picked = subprocess.run(["bash", str(README.parent / ".ci" / "run"), "--print-command"], capture_output=True, text=True)
    assert picked.stdout.strip() == commands[1]


def test_the_quickstart_is_under_15_lines():
    quickstart = _blocks("python")[0].strip().splitlines()
    assert len(quickstart) < 15


def test_the_quickstart_runs_and_prints_what_it_says(capsys):
    blocks = _blocks("python")
    assert len(blocks) == 1  # the rest lives in docs/, where tests/test_docs.py runs it
    exec(compile(blocks[0], "README.md quickstart", "exec"), {})
    assert "torch.Size([32, 1])" in capsys.readouterr().out


def test_headline_numbers_are_the_benchmarks_published_in_docs():
    """Each number in the README's tables stands in docs/benchmarks.md, which has the full tables and commands."""
    published = (README.parent / "docs" / "benchmarks.md").read_text()
    rows = [line for line in README.read_text().splitlines() if line.startswith("|") and not line.startswith("|---")]
    numbers = [cell.strip() for row in rows for cell in row.strip("|").split("|") if re.fullmatch(r"\s*[+-]?\d+\.\d+x?\s*", cell)]
    assert len(numbers) >= 20
    missing = [number for number in numbers if number not in published]
    assert not missing, f"README numbers not found in docs/benchmarks.md: {missing}"


def test_the_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 130
    for page in ("index", "guide", "concepts", "config_list", "migrating_from_nni", "cli", "integrations", "benchmarks"):
        assert f"docs/{page}.md" in text


def test_links_reach_existing_pages_and_headings():
    from test_docs import _anchors

    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", README.read_text()):
        linked = README.parent / target
        assert linked.exists(), f"README.md links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(linked), f"README.md links to {target}#{anchor}: no such heading"
