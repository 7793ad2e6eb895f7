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


def test_every_test_the_readme_cites_exists():
    """The reliability table backs each row with a test: a renamed or deleted test must not leave a stale row."""
    readme = (share_lab.ROOT / "README.md").read_text()
    cited = set(re.findall(r"`(test_\w+\.py)::(test_\w+)", readme))
    assert len(cited) >= 20
    missing = [f"{f}::{t}" for f, t in sorted(cited)
               if not (share_lab.ROOT / "tests" / f).is_file() or f"def {t}(" not in (share_lab.ROOT / "tests" / f).read_text()]
    assert not missing, missing
