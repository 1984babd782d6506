"""Activations of named modules, caught by forward hooks: the one way stages read them.

:class:`Capture` hands every hooked module's input (a pre-hook) or output (a forward hook,
which may return a replacement) to a function, and can stop the forward pass once the last
module a caller needs has run (:class:`Stop`, caught by :func:`until_stop`): later layers cost
nothing. Its hooks go away on :meth:`Capture.remove` or on leaving ``with``, also when the
forward fails.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


class Stop(Exception):
    """Raised after the last module a capture needs: the rest of the forward is skipped."""


class Capture:
    """Hooks on ``modules`` (by key) calling ``take(key, tensor)`` with each one's first input,
    or with ``outputs`` its output (a value ``take`` returns replaces it); ``stop_after``: a
    module after whose forward the pass stops (:class:`Stop`)."""

    def __init__(self, modules: Mapping[Any, nn.Module],
                 take: Callable[[Any, torch.Tensor], torch.Tensor | None], *,
                 outputs: bool = False, stop_after: nn.Module | None = None):
        self.handles = []
        try:
            for key, module in modules.items():
                self.handles.append(module.register_forward_hook(self._output(key, take))
                                    if outputs else
                                    module.register_forward_pre_hook(self._input(key, take)))
            if stop_after is not None:
                self.handles.append(stop_after.register_forward_hook(_stop))
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _input(key, take):
        def hook(module, args):
            take(key, args[0])
        return hook

    @staticmethod
    def _output(key, take):
        def hook(module, args, output):
            return take(key, output)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _stop(module, args, output):
    raise Stop


def until_stop(forward: Callable[..., Any], *args, **kwargs) -> None:
    """``forward(*args, **kwargs)``, ended early by a capture's :class:`Stop`."""
    try:
        forward(*args, **kwargs)
    except Stop:
        pass
