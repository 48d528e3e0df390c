"""The README's commands are the ones CI runs, and the library does not look for development assets."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> dict[str, str]:
    """The first command line after the README's "Quickstart" and "Tests" paragraphs."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^(Quickstart|Tests)\b.*?```bash\n(.*?)\n```", readme, flags=re.S | re.M)
    return {name: command.strip() for name, command in blocks}


def test_ci_runs_the_readme_commands_verbatim():
    commands = readme_commands()
    assert set(commands) == {"Quickstart", "Tests"}
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for name, command in commands.items():
        assert command in ci_lines, f"the README's {name} command is not a line of .ci/run: {command}"


def test_library_never_looks_for_development_assets():
    offenders = [f"{path.relative_to(REPO)}:{i}" for path in sorted((REPO / "sparse_peft").rglob("*.py"))
                 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"\.\./shared|shared_dir|SPARSE_PEFT_ASSETS|parents\[2\]", line)]
    assert not offenders, offenders
