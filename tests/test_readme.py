"""The README's two commands are the ones the project runs: CI calls exactly its test command."""

import re

import share_lab

ROOT = share_lab.ROOT


def test_ci_runs_exactly_the_readme_test_command():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    demo, test = first_block.strip().splitlines()
    assert (demo, test) == ("bash scripts/demo.sh", "bash scripts/test.sh")
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[-1] == test
    assert all(line.startswith("cd ") for line in commands[:-1])  # nothing else runs before it
