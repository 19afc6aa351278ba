"""Every `detr` command the README shows parses with the real command line, and each subcommand's --help runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from detr.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """The `detr ...` (and `torchrun ... -m detr.cli ...`) lines of the README's fenced shell blocks,
    continuation lines joined and comments dropped, as argument lists after `detr`."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["detr"]:
                commands.append(words[1:])
            elif words[:1] == ["torchrun"] and "detr.cli" in words:
                commands.append(words[words.index("detr.cli") + 1:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    subcommands = {c[0] for c in COMMANDS}
    assert {"train", "eval", "predict", "export"} <= subcommands
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_readme_command_parses(args):
    parsed = build_parser().parse_args(args)  # an unknown flag or a missing argument exits here
    assert callable(parsed.func)


@pytest.mark.parametrize("path", sorted({tuple(c[:2]) if c[0] == "data" else (c[0],) for c in COMMANDS}))
def test_help_runs(path, capsys):
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0 and "usage: detr" in capsys.readouterr().out
