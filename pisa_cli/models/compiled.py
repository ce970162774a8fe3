"""Optional torch.compile, with a clean fall-back to eager execution wherever it fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from pisa_cli.models.device import is_out_of_memory

log = logging.getLogger(__name__)


class CompiledOrEager:
    """Calls ``torch.compile(function)``; the first failure (no compiler, an unsupported
    operation, a backend error) is logged once and the eager function is used from then on.
    Out-of-memory errors are not failures of the compiler: they propagate as they are."""

    def __init__(self, function: Callable[..., Any], label: str):
        self.eager = function
        self.label = label
        self.compiled: Callable[..., Any] | None
        try:
            self.compiled = torch.compile(function)
        except Exception as error:
            self._give_up(error)

    def _give_up(self, error: BaseException) -> None:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        log.warning(
            "torch.compile of the %s failed (%s: %s); running it without compiling",
            self.label,
            type(error).__name__,
            reason,
        )
        self.compiled = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:
                if is_out_of_memory(error):
                    raise
                self._give_up(error)
        return self.eager(*args, **kwargs)
