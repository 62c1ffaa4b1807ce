"""`cts --help` and every command's help: what they print, the command names and their aliases.

Typer renders help with rich markup, where ``[word]`` is a style tag that disappears from the
output; a help text that means the brackets must escape them (``\\[``). Help is read at 80
columns, a terminal's usual width, where rich would cut a long option name with an ellipsis.
"""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from cts.cli import app

runner = CliRunner()
# Former names of commands, still accepted (hidden from the help): alias -> command.
ALIASES = {
    ("import-checkpoint",): ("import_checkpoint",),
    ("kfp", "run-local"): ("kfp", "run_local"),
}


def _commands(command=None, path: tuple[str, ...] = ()):
    """``(path, click command)`` of the app and every command and group under it, the hidden
    aliases included."""
    command = command or typer.main.get_command(app)
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _render(path: tuple[str, ...]) -> str:
    """``cts PATH --help`` as an 80-column terminal shows it."""
    env = {"COLUMNS": "80", "TERMINAL_WIDTH": None}
    result = runner.invoke(app, [*path, "--help"], env=env, prog_name="cts")
    assert result.exit_code == 0, result.output
    return result.output


def _help(path: tuple[str, ...]) -> str:
    """The help of ``cts PATH --help`` as one line: no box borders, single spaces."""
    return " ".join(_render(path).replace("│", " ").split())


@pytest.mark.parametrize("path", [(), ("kfp",)])
def test_help_shows_the_cluster_extra_install(path):
    assert "pip install -e '.[cluster]'" in _help(path)


@pytest.mark.parametrize("path", [path for path, _ in _commands()], ids=" ".join)
def test_help_shows_every_bracket_its_text_has(path):
    command = dict(_commands())[path]
    texts = [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
    shown = _help(path)
    for text in texts:
        for bracketed in re.findall(r"\\?\[[^\]]*\]", text):
            assert bracketed.removeprefix("\\") in shown, (path, bracketed)


@pytest.mark.parametrize("path", [path for path, _ in _commands()], ids=" ".join)
def test_help_at_80_columns_shows_its_command_and_every_option_name_in_full(path):
    command = dict(_commands())[path]
    text = _render(path)
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert f"Usage: {' '.join(('cts', *path))} " in text
    words = set(re.findall(r"[\w-]+", text))
    names = [n for p in command.params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")]
    assert [name for name in names if name not in words] == [], text


def test_help_lists_the_underscore_names_only():
    listed = re.findall(r"^│ (\w\S*) ", runner.invoke(app, ["--help"]).output, re.MULTILINE)
    assert "import_checkpoint" in listed and "train_policy" in listed
    assert not [name for name in listed if "-" in name]
    kfp = re.findall(r"^│ (\w\S*) ", runner.invoke(app, ["kfp", "--help"]).output, re.MULTILINE)
    assert kfp == ["compile", "run_local"]


@pytest.mark.parametrize("alias", list(ALIASES), ids=" ".join)
def test_former_names_run_the_same_command(alias, tmp_path):
    """Same options, same output and exit status (here: a refusal before any work)."""
    args = [str(tmp_path / "missing.pth")] if alias[0] != "kfp" else ["--out", str(tmp_path)]
    old = runner.invoke(app, [*alias, *args])
    new = runner.invoke(app, [*ALIASES[alias], *args])
    assert (old.exit_code, old.output) == (new.exit_code, new.output)
    assert new.exit_code == 1 and new.output.startswith(f"error: {' '.join(ALIASES[alias])}:")
