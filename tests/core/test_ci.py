"""CI runs what the README tells users to run: its test command, word for word, in a fresh venv."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"^Run the tests:\n\n    (.+)$", readme, re.M)
    script = (ROOT / ".ci" / "run").read_text()
    lines = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert lines[-1] == f'{command} "$@"', f".ci/run must end with the README's test command: {command}"
    venv = lines.index('"${PYTHON:-python3}" -m venv --clear .ci/venv')
    assert venv < lines.index(". .ci/venv/bin/activate") < len(lines) - 1
    assert ".ci/venv/" in (ROOT / ".gitignore").read_text().splitlines()
