"""docs/cli.md cannot rot: every command of the click tree has its section, every option and argument of the
command appears in that section, and every exit code the toolkit's errors carry is in its exit-code table."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from convnextv2.converters.cli import main
from convnextv2.reference import errors

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _sections() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    sections = {}
    for part in parts[1:]:
        title, _, body = part.partition("\n")
        sections[title.strip()] = body
    return sections


def _commands() -> list[str]:
    return sorted(main.commands)


def test_every_command_has_a_section():
    sections = _sections()
    missing = [name for name in _commands() if f"`convnextv2 {name}`" not in sections]
    assert not missing, f"{DOC}: no '## `convnextv2 NAME`' section for {missing}"
    unknown = [title for title in sections if title.startswith("`convnextv2 ")
               and title.strip("`").split()[1] not in main.commands]
    assert not unknown, f"{DOC}: sections for commands the command line does not have: {unknown}"


@pytest.mark.parametrize("name", _commands())
def test_every_option_of_a_command_is_in_its_section(name):
    body = _sections().get(f"`convnextv2 {name}`", "")
    command = main.commands[name]
    missing = []
    for param in command.params:
        if isinstance(param, click.Argument):
            if param.make_metavar(click.Context(command)) not in body:
                missing.append(param.human_readable_name)
            continue
        missing += [opt for opt in [*param.opts, *param.secondary_opts] if f"`{opt}`" not in body]
    assert not missing, f"{DOC}, section `convnextv2 {name}`: {missing} not documented"


def test_group_options_are_documented():
    text = DOC.read_text(encoding="utf-8")
    context = click.Context(main, info_name="convnextv2")
    opts = [opt for param in main.get_params(context) for opt in [*param.opts, *param.secondary_opts]]
    assert "--help" in opts and "--version" in opts
    missing = [opt for opt in opts if f"`{opt}`" not in text]
    assert not missing, f"{DOC}: the group's {missing} not mentioned"


def test_exit_code_table_lists_every_code_the_errors_carry():
    body = _sections()["Exit codes"]
    rows = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", body, flags=re.MULTILINE)}
    carried = {cls.exit_code for cls in vars(errors).values()
               if isinstance(cls, type) and issubclass(cls, errors.ConvNeXtV2Error)}
    # 0 is success; every other documented code must be one some error (or a failed check) produces.
    assert carried <= rows, f"{DOC}: exit codes {sorted(carried - rows)} have no row"
    assert rows - carried <= {0}, f"{DOC}: rows for exit codes no error carries: {sorted(rows - carried - {0})}"


def test_readme_exit_codes_match_the_cli_doc():
    def rows(text: str) -> list[str]:
        return re.findall(r"^\| \d+ \|.*$", text, flags=re.MULTILINE)

    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    assert rows(readme) == rows(_sections()["Exit codes"]), "README's exit-code table differs from docs/cli.md's"


def _option_rows(body: str, cell: int = 2) -> dict[str, str]:
    """Option -> one cell of its row in a section's option table (2: the documented default, 1: its values)."""
    rows = {}
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`-"):
            for option in re.findall(r"`(-[^`]+)`", cells[0]):
                rows[option] = cells[cell]
    return rows


@pytest.mark.parametrize("name", _commands())
def test_documented_choices_are_the_real_ones(name):
    """An option that takes one of a list (formats, layouts, runtimes) documents exactly that list, in order:
    a format added to the registry shows up here or the test says where it is missing."""
    rows = _option_rows(_sections().get(f"`convnextv2 {name}`", ""), cell=1)
    wrong = []
    for param in main.commands[name].params:
        if not isinstance(param, click.Option) or not isinstance(param.type, click.Choice) \
                or param.opts[0] not in rows:
            continue
        documented = re.findall(r"`([^`]+)`", rows[param.opts[0]])
        if documented != [str(c) for c in param.type.choices]:
            wrong.append(f"{param.opts[0]}: documented {documented}, the command offers {list(param.type.choices)}")
    assert not wrong, f"{DOC}, section `convnextv2 {name}`: " + "; ".join(wrong)


@pytest.mark.parametrize("name", _commands())
def test_documented_defaults_are_the_real_ones(name):
    """A default the command declares is documented as it is; an option without one never shows click's
    placeholder (``Sentinel.UNSET``) but the effective behaviour or nothing."""
    rows = _option_rows(_sections().get(f"`convnextv2 {name}`", ""))
    wrong = []
    for param in main.commands[name].params:
        if not isinstance(param, click.Option) or param.opts[0] not in rows:
            continue
        shown = rows[param.opts[0]]
        default = param.default
        if "Sentinel" in shown or "UNSET" in shown:
            wrong.append(f"{param.opts[0]}: {shown}")
        elif not param.is_flag and isinstance(default, str | int | float) and not isinstance(default, bool) \
                and shown != f"`{default}`":
            wrong.append(f"{param.opts[0]}: documented {shown or '(nothing)'}, the command's default is {default!r}")
    assert not wrong, f"{DOC}, section `convnextv2 {name}`: " + "; ".join(wrong)
