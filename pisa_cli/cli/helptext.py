"""Help that reads as written: every command's help is taken as plain text (no rich markup,
so ``[metrics]`` stays), paragraphs flow to the terminal's width, flags show no value
placeholder, and arguments show their name (``INPUTS...``) instead of a Python type."""

from __future__ import annotations

import inspect

import click
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup


def plain_help(text: str | None) -> str:
    """A docstring as rich text: each paragraph on one line (rich wraps it to the
    terminal), markup characters escaped, double backticks of code names dropped."""
    paragraphs = inspect.cleandoc(text or "").split("\n\n")
    flowed = [" ".join(line.strip() for line in part.splitlines()) for part in paragraphs]
    return escape("\n\n".join(flowed).replace("``", ""))


def first_sentence(text: str | None) -> str:
    """The first paragraph of a docstring on one line, code backticks dropped (for lists)."""
    return plain_help(text).split("\n\n")[0].replace("\\[", "[")


class _PlainParams:
    """Gives a typer command or group plain help for its parameters, --help included."""

    def _plain_params(self) -> None:
        for param in self.params:  # type: ignore[attr-defined]
            _plain(param)

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _plain(option)
        return option


class Command(_PlainParams, TyperCommand):
    """A typer command whose parameters' help and placeholders read as plain text."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = plain_help(self.help)
        self._plain_params()


class Group(_PlainParams, TyperGroup):
    """The ``pisa`` group, its own options (--version, --help) as plain as a command's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._plain_params()


def _plain(param: click.Parameter) -> None:
    help_text = getattr(param, "help", None)
    if help_text:
        param.help = plain_help(help_text)  # type: ignore[attr-defined]
    if isinstance(param, TyperArgument):
        name = param.metavar or (param.name or "").upper()
        param.metavar = name
        suffix = "..." if param.nargs != 1 else ""
        # the name says what it is; no "<list[Path]>" type column, no "{inputs}" in usage
        param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
        param._usage_display_name = lambda: (  # type: ignore[attr-defined]
            name + suffix if param.required else f"[{name}]{suffix}"
        )
        param._rich_display_name = lambda: name + suffix  # type: ignore[attr-defined]
    elif getattr(param, "is_flag", False):
        param.metavar = ""  # a flag takes no value: no "<bool>"
