"""What the fault experiments share: single-bit flips of the weights held in the run's bit format
(src/sensitivity/bit_targets.py), uniform draws of them, applying and undoing them, and the rows
that describe them."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from src.eval.perplexity import EvalResult, evaluate
from src.models.components import to_out_in
from src.sensitivity.perturb import FLOAT_LAYOUT
from src.utils import signals


@dataclass(frozen=True)
class Flip:
    name: str      # parameter
    index: int     # flat index into the stored tensor
    bit: int       # 0 = least significant


class FlipStack:
    """Flips applied one after another and undone in reverse order (``undo_all``, also on an
    error or a signal when used as a context manager). One weight may be flipped twice."""

    def __init__(self, targets: dict):
        self.targets = targets
        self._saved: list[tuple[Flip, torch.Tensor, object]] = []

    def push(self, flip: Flip) -> None:
        target = self.targets[flip.name]
        idx = torch.tensor([flip.index], device=target.flat.device)
        with torch.no_grad():
            self._saved.append((flip, idx, target.apply(idx, flip.bit)))

    def pop(self) -> None:
        flip, idx, saved = self._saved.pop()
        with torch.no_grad():
            self.targets[flip.name].restore(idx, saved)

    def undo_all(self) -> None:
        with signals.deferred():
            while self._saved:
                self.pop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo_all()


@contextmanager
def applied(targets: dict, flips: list[Flip]):
    """``flips`` applied in order while the block runs, undone exactly afterwards."""
    with FlipStack(targets) as stack:
        for flip in flips:
            stack.push(flip)
        yield


def uniform_flips(targets: dict, n: int, seed: int, bit=None) -> list[Flip]:
    """``n`` independent flips drawn uniformly over every bit of every weight of ``targets``
    (``bit``: only that position of each weight, resolved per tensor)."""
    names = list(targets)
    numel = np.array([targets[name].flat.numel() for name in names], dtype=np.int64)
    per_weight = np.array([1 if bit is not None else targets[name].n_bits for name in names],
                          dtype=np.int64)
    population = numel * per_weight
    ends = np.cumsum(population)
    draws = np.random.default_rng(seed).integers(0, int(ends[-1]), n)
    which = np.searchsorted(ends, draws, side="right")
    offsets = draws - (ends - population)[which]
    flips = []
    for tensor, offset in zip(which.tolist(), offsets.tolist()):
        name = names[tensor]
        if bit is None:
            index, position = divmod(offset, int(per_weight[tensor]))
        else:
            index, position = offset, targets[name].resolve(bit)
        flips.append(Flip(name, index, position))
    return flips


def population_bits(targets: dict, bit=None) -> int:
    """How many bits uniform draws choose among."""
    return sum(t.flat.numel() * (1 if bit is not None else t.n_bits) for t in targets.values())


def value_change(targets: dict, flip: Flip) -> tuple[torch.Tensor, torch.Tensor]:
    """(value before, value after) of the flipped weight, in its dtype (device tensors)."""
    target = targets[flip.name]
    idx = torch.tensor([flip.index], device=target.flat.device)
    return target.current(idx)[0].clone(), target.flipped(idx, flip.bit)[0]


def same_bits(before: torch.Tensor, after: torch.Tensor) -> bool:
    """True when a flip leaves the stored bits as they were (a code in a group of scale 0):
    nothing the model computes can change, so nothing needs evaluating."""
    as_int = FLOAT_LAYOUT[before.dtype][0]
    return torch.equal(before.reshape(1).view(as_int), after.reshape(1).view(as_int))


def flip_row(flip: Flip, metas: dict, before: float, after: float) -> dict:
    """The flip as a table row: [out, in] coordinates, component, layer, values."""
    meta = metas[flip.name]
    row, col = to_out_in(meta, torch.tensor([flip.index]))
    return {"parameter": flip.name, "layer": meta.layer, "component": meta.component,
            "row": int(row[0]), "col": int(col[0]), "flat_index": flip.index, "bit": flip.bit,
            "value_before": before, "value_after": after}


def measurer(model, blocks, batch_size: int, ranks):
    """The model as it is now on ``blocks`` (token-mean NLL, perplexity)."""
    def measure() -> EvalResult:
        return evaluate(model, blocks, batch_size, ranks=ranks)
    return measure


def first_blocks(blocks, n: int):
    return blocks.subset(range(min(n, len(blocks))))
