"""Evaluate a model after a change inside one decoder block without recomputing the blocks
before it.

``LayerReplay(model, blocks, batch_size)`` runs the model once on ``blocks`` and keeps every
decoder block's output, per batch. ``evaluate_from(layer)`` then evaluates with blocks
0..layer-1 replaced by modules that hand back those outputs: the embeddings (cheap) still run,
the blocks that a change in block ``layer`` cannot reach are skipped. Exact: those blocks see
the same inputs and weights as in the recording, so their outputs are the same; the weights of
blocks 0..layer-1 must not change in between (the caller's contract). Memory: one hidden state
per block and token of ``blocks``.

The decoder blocks are the ``nn.ModuleList`` whose items parameter names number (``...layers.3.``,
GPT-2's ``transformer.h.3.``): found from a scored parameter's name and its layer index.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from src.eval.perplexity import EvalResult, evaluate


class _Replayed(torch.nn.Module):
    """Stands in for a decoder block: returns its recorded output for the next batch (a copy:
    the model may add into it), and reads other attributes from the block it replaces."""

    def __init__(self, block: torch.nn.Module, outputs: list):
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_outputs", outputs)
        object.__setattr__(self, "_next", 0)

    def forward(self, *args, **kwargs):
        output = self._outputs[self._next]
        object.__setattr__(self, "_next", self._next + 1)
        return _copy(output)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


def _copy(output):
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return type(output)(_copy(o) for o in output)
    return output


def decoder_blocks(model: torch.nn.Module, param_name: str, layer: int) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks that holds ``param_name`` as block ``layer``."""
    marker = f".{layer}."
    prefix = param_name[:param_name.index(marker)] if marker in param_name else None
    blocks = model.get_submodule(prefix) if prefix else None
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder blocks of {param_name} (layer {layer})")
    return blocks


class LayerReplay:
    def __init__(self, model, blocks, batch_size: int, layer_list: torch.nn.ModuleList | None,
                 ranks=None):
        """``layer_list`` None: nothing to replay (every evaluation runs in full)."""
        self.model, self.blocks, self.batch_size, self.ranks = model, blocks, batch_size, ranks
        self.layer_list = layer_list
        self.outputs: list[list] = [[] for _ in (layer_list or ())]
        hooks = [block.register_forward_hook(self._recorder(i))
                 for i, block in enumerate(layer_list or ())]
        try:
            self.baseline = evaluate(model, blocks, batch_size, ranks=ranks)
        finally:
            for hook in hooks:
                hook.remove()

    def _recorder(self, index: int):
        def record(module, args, output):
            self.outputs[index].append(_copy(output))
        return record

    def evaluate_from(self, layer: int | None) -> EvalResult:
        """The model evaluated with blocks before ``layer`` replayed (None: nothing replayed)."""
        with self.replaying(0 if layer is None else layer):
            return evaluate(self.model, self.blocks, self.batch_size, ranks=self.ranks)

    @contextmanager
    def replaying(self, n_blocks: int):
        originals = [self.layer_list[i] for i in range(n_blocks)]
        try:
            for i, block in enumerate(originals):
                self.layer_list[i] = _Replayed(block, self.outputs[i])
            yield
        finally:
            for i, block in enumerate(originals):
                self.layer_list[i] = block
