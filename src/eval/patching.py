"""Activation recording and patching on module outputs, through forward hooks.

A module's *output* is the tensor it returns (the first item when it returns a tuple, as decoder
blocks may); its last dimension holds the channels. ``Recorder`` keeps, per forward call, a copy
of chosen modules' outputs; ``patched`` replaces chosen channels (optionally at chosen positions
only) of chosen modules' outputs while it is open. Both count forward calls: call i of a module
is the i-th batch it sees, so a recording made over some batches patches a later pass over the
same batches in the same order (under torchrun: each rank's own batches).

Every hook is removed on exit, also on error; ``hook_count`` lets callers verify that.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch


def output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def with_tensor(output, tensor: torch.Tensor):
    """``output`` with its tensor replaced by ``tensor`` (tuples keep their other items)."""
    if isinstance(output, tuple):
        return type(output)((tensor, *output[1:]))
    return tensor


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on all of the model's modules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Recorder:
    """While open: per forward call, a CPU copy of each module's output (``outputs[name]``)."""

    def __init__(self, modules: dict[str, torch.nn.Module], to_cpu: bool = True):
        self.modules, self.to_cpu = modules, to_cpu
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self._handles = []

    def __enter__(self) -> "Recorder":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._keeper(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            tensor = output_tensor(output).detach()
            self.outputs[name].append(tensor.cpu() if self.to_cpu else tensor.clone())
        return keep


@dataclass(frozen=True)
class Patch:
    """Replace ``channels`` (None: all) of ``module``'s output by ``value(call, output)``
    (a tensor broadcastable to output[..., channels]) where ``positions(call)`` is True ([batch,
    length] bool; None: everywhere)."""
    module: torch.nn.Module
    channels: torch.Tensor | None
    value: Callable[[int, torch.Tensor], torch.Tensor]
    positions: Callable[[int], torch.Tensor] | None = None

    def apply(self, call: int, output: torch.Tensor) -> torch.Tensor:
        index = slice(None) if self.channels is None else self.channels.to(output.device)
        new = self.value(call, output).to(device=output.device, dtype=output.dtype)
        old = output[..., index]
        if self.positions is not None:
            where = self.positions(call).to(output.device)[..., None]
            new = torch.where(where, new, old)
        patched = output.clone()
        patched[..., index] = new.expand_as(old)
        return patched


def clean_values(recorded: list[torch.Tensor], channels: torch.Tensor | None):
    """Patch value: the recorded output of the same call (its ``channels``)."""
    def value(call: int, output: torch.Tensor) -> torch.Tensor:
        tensor = recorded[call]
        return tensor if channels is None else tensor[..., channels.to(tensor.device)]
    return value


def constant(values: torch.Tensor):
    """Patch value: the same value per channel at every position."""
    def value(call: int, output: torch.Tensor) -> torch.Tensor:
        return values
    return value


@contextmanager
def patched(patches: list[Patch]):
    """The patches applied to every forward call while open; removed on exit."""
    handles = []
    try:
        for patch in patches:
            handles.append(patch.module.register_forward_hook(_patcher(patch)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _patcher(patch: Patch):
    calls = [0]

    def hook(module, inputs, output):
        call = calls[0]
        calls[0] += 1
        return with_tensor(output, patch.apply(call, output_tensor(output)))
    return hook
