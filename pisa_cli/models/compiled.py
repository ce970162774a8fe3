"""Optional torch.compile, with a clean fall-back to eager execution wherever it fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from pisa_cli.models.device import is_out_of_memory

log = logging.getLogger(__name__)


def recompile_limit() -> int:
    """Graphs torch.compile makes of one function before it runs it eagerly, silently."""
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


class CompiledOrEager:
    """Calls ``torch.compile(function)``; the first failure (no compiler, an unsupported
    operation, a backend error) is logged once and the eager function is used from then on.
    Out-of-memory errors are not failures of the compiler: they propagate as they are.

    Each graph compiled is logged (with --verbose) with its input shapes, so a shape that
    keeps changing shows; as many graphs as torch's recompile limit, past which it runs the
    function eagerly without a word, is a warning (graph breaks count too: a warning
    early rather than never)."""

    def __init__(self, function: Callable[..., Any], label: str, backend: str = "inductor"):
        self.eager = function
        self.label = label
        self.graphs = 0
        """Graphs compiled so far (the first compile and every recompile)."""
        self.compiled: Callable[..., Any] | None
        try:
            self.compiled = torch.compile(function, backend=self._counting(backend))
        except Exception as error:
            self._give_up(error)

    def _counting(self, name: str) -> Callable[..., Any]:
        def backend(graph, inputs):
            self.graphs += 1
            shapes = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)][:4]
            log.debug(
                "torch.compile: graph %d of the %s, inputs %s", self.graphs, self.label, shapes
            )
            if self.graphs == recompile_limit():
                log.warning(
                    "torch.compile has made %d graphs of the %s, torch's recompile limit: "
                    "further input shapes may run without compiling",
                    self.graphs,
                    self.label,
                )
            return torch._dynamo.lookup_backend(name)(graph, inputs)

        return backend

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
