"""The bare forward+backward every gradient figure is a ratio to: the work no gradient metric can
avoid (src/bench/__init__.py).

A step is the calibration loss (``loss_sum``, the metrics' own) and its backward, with gradients
of exactly the scored weights (``gradients_only_on``, as every gradient metric) accumulated into
``.grad`` buffers allocated (as zeros) once per timed call, outside the timing: no step pays for
gradients of the embeddings, the output head or 1-D weights, nor for allocating or clearing
gradient buffers.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from src.sensitivity.scoring import gradients_only_on, loss_sum


@contextmanager
def scored_gradients_kept(model, params: dict[str, torch.nn.Parameter]):
    """requires_grad on exactly ``params``, each with a zero ``.grad`` kept across steps; on exit
    the flags are restored and the buffers dropped."""
    with gradients_only_on(model, params):
        for param in params.values():
            param.grad = torch.zeros_like(param)
        yield


def gradient_step(model, input_ids, attention_mask) -> None:
    """One bare forward+backward inside ``scored_gradients_kept``: the batch's gradients
    accumulate into the kept buffers in place, as a gradient metric's accumulators do (no buffer
    is allocated or cleared per step)."""
    loss_sum(model, input_ids, attention_mask).backward()
