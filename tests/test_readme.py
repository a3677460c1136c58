"""The README's commands and code blocks."""

import re
import subprocess
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "index, printed, needs",
    [
        (0, "torch.Size([32, 1])", None),
        (1, "[('0', '1', '2')]", None),
        (2, "[]\n1.0", None),
        (3, "report.html ['0', '2']", "matplotlib"),
        (4, "8 8", "lightning"),
        (5, "14 3", "transformers"),
    ],
)
def test_python_blocks_run_and_print_what_they_say(index, printed, needs, capsys):
    if needs is not None:
        pytest.importorskip(needs, reason=f"this README block needs the {needs} extra")
    blocks = _blocks("python")
    assert len(blocks) == 6
    exec(compile(blocks[index], f"README.md python block {index}", "exec"), {})
    assert printed in capsys.readouterr().out
