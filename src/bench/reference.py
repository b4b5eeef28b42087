"""The bare forward+backward every gradient figure is a ratio to: the work no gradient metric can
avoid (src/bench/__init__.py).

A step is the calibration loss (``loss_sum``, the metrics' own) and its backward, with gradients
of exactly the scored weights (``gradients_only_on``, as every gradient metric) written into
``.grad`` buffers allocated once and zeroed in place, so no step pays for gradients of the
embeddings, the output head or 1-D weights, nor for allocating gradients again.
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


def gradient_step(model, params: dict[str, torch.nn.Parameter], input_ids,
                  attention_mask) -> None:
    """One bare forward+backward inside ``scored_gradients_kept``: the kept buffers zeroed in
    place, then the batch's gradient accumulated into them."""
    for param in params.values():
        param.grad.zero_()
    loss_sum(model, input_ids, attention_mask).backward()
