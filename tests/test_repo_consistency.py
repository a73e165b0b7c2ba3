"""README's two set-up commands, CI and the requirement pins agree."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_starts_with_main_job_and_test_commands():
    commands = readme_commands()
    assert commands == ["bash launch_scripts/quickstart.sh", "bash launch_scripts/test.sh"]
    for command in commands:
        assert (REPO / command.split()[1]).is_file()


def test_ci_runs_readme_test_command_after_installing_from_scratch():
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert "set -euo pipefail" in ci
    assert ci[-1] == readme_commands()[1]
    installs = [line for line in ci if "pip install" in line]
    assert "torch==2.13.0" in installs[0] and ".[test]" in installs[1]
