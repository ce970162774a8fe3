"""Model families as plug-ins: the registry.

Each family is one module here (``pisa_sr``, ``omgsr``, ``hypir``, ``unet_lora`` for a plain
second-pass LoRA), a ``Family`` (``base``) that says how it recognises and loads its
weights, plans its passes and describes itself. Other families install as Python packages
that name a ``Family`` (an instance, or a class made with no arguments) in the entry-point
group ``pisa_cli.families``; they are found at start-up, tried before the built-in ones,
and listed by `pisa doctor`. See CONTRIBUTING.md "Adding a family".
"""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

from pisa_cli.core.families.base import Family, LoadedWeights
from pisa_cli.core.families.hypir import Hypir
from pisa_cli.core.families.omgsr import Omgsr
from pisa_cli.core.families.pisa_sr import PisaSR
from pisa_cli.core.families.unet_lora import UnetLora
from pisa_cli.core.passes import Role
from pisa_cli.errors import WeightsError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "pisa_cli.families"
BUILT_IN: tuple[Family, ...] = (Omgsr(), Hypir(), PisaSR(), UnetLora())
"""The built-in families in the order they are asked; the last for each role (PiSA-SR for
the first pass, a UNet LoRA for the second) takes whatever the others do not claim."""

_registered: list[Family] = []

__all__ = ["BUILT_IN", "Family", "LoadedWeights", "families", "family_of", "named", "register"]


@cache
def plugins() -> tuple[tuple[Family, ...], tuple[str, ...]]:
    """(families, problems) from the entry-point group, loaded once; a plug-in that fails
    to load is a problem line (logged, shown by `pisa doctor`), never a crash."""
    found, problems = [], []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            family = point.load()
            family = family() if isinstance(family, type) else family
            if not isinstance(family, Family) or not family.name:
                raise TypeError(f"{family!r} is not a named pisa_cli Family")
        except Exception as error:  # a broken plug-in must not break the CLI
            problems.append(f"{point.name} ({point.value}): {error}")
            log.warning("family plug-in %s not loaded: %s", point.name, error)
            continue
        found.append(family)
    return tuple(found), tuple(problems)


def register(family: Family) -> None:
    """Add a family in-process (tests, notebooks); asked before the built-in ones."""
    if family not in _registered:
        _registered.insert(0, family)


def unregister(family: Family) -> None:
    if family in _registered:
        _registered.remove(family)


def families() -> tuple[Family, ...]:
    """Every family, in the order weights are offered to them."""
    return (*_registered, *plugins()[0], *BUILT_IN)


def named(name: str) -> Family:
    """The family called ``name`` (WeightsError when none is)."""
    for family in families():
        if family.name == name:
            return family
    raise WeightsError(f"no model family named {name!r}")


def family_of(path: str | Path, role: Role = "first") -> Family:
    """The family whose weights ``path`` holds, for the pass ``role`` (asked in order: the
    fallbacks last). WeightsError when the family it is cannot serve that pass."""
    if not str(path):  # the default weights: the role's fallback reads and checks them
        return next(f for f in reversed(families()) if role in f.roles)
    path = Path(path).expanduser()
    for family in families():
        if family.recognises(path, role):
            if role not in family.roles:
                where = "--weights" if role == "second" else "--second-pass-weights"
                raise WeightsError(
                    f"{path}: {family.short} weights run as the {family.roles[0]} pass only "
                    f"(pass them as {where})"
                )
            return family
    raise WeightsError(f"{path}: no model family recognises these weights")
