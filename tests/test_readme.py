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


def test_quickstart_runs_and_prints_per_channel_scales(capsys):
    exec(compile(_blocks("python")[0], "README.md quickstart", "exec"), {})
    assert "torch.Size([32, 1])" in capsys.readouterr().out
