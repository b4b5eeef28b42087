"""The clean recording that every mediation experiment patches from, and evaluation through
replayed decoder blocks.

One clean pass over the evaluation blocks records every decoder block's output (a
``LayerReplay``: the blocks before a change are replayed, not recomputed) and, on CPU, the
output of each hooked module (the sources' modules, every block's attention and MLP output
projection). An experiment changes the model at block ``layer`` or later (zeroed weights,
patched outputs) and is evaluated from there: exact, since the blocks before see the same
inputs and weights as in the recording.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from src.eval.patching import Patch, Recorder, clean_values, output_tensor, patched
from src.eval.perplexity import EvalResult, evaluate
from src.eval.replay import LayerReplay
from src.models.components import component_of, layer_index
from src.sensitivity.perturb import perturbed

SITE_COMPONENTS = {"attention": "attn_o", "mlp": "mlp_down"}


def block_modules(model, n_blocks: int) -> dict[str, dict[int, str]]:
    """kind (attention, mlp) -> block index -> name of its output projection module."""
    found: dict[str, dict[int, str]] = {kind: {} for kind in SITE_COMPONENTS}
    for name, param in model.named_parameters():
        layer = layer_index(name)
        if layer is None or layer >= n_blocks or not name.endswith(".weight") or param.ndim != 2:
            continue
        for kind, component in SITE_COMPONENTS.items():
            if component_of(name) == component:
                found[kind][layer] = name.rsplit(".", 1)[0]
    return found


class Lab:
    def __init__(self, model, blocks, batch_size: int, ranks, layer_list, module_names):
        self.model, self.blocks, self.batch_size, self.ranks = model, blocks, batch_size, ranks
        self.layer_list = layer_list
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        recorded = {name: self.modules[name] for name in dict.fromkeys(module_names)}
        with Recorder(recorded) as recorder:
            self.replay = LayerReplay(model, blocks, batch_size, layer_list, ranks)
        self.clean: EvalResult = self.replay.baseline
        self.outputs = recorder.outputs
        batches = [i for i in ranks.my_batches(-(-len(blocks) // batch_size)) if i is not None]
        self.masks = [blocks.batch(i, batch_size)[1].bool() for i in batches]
        self.batches = batches
        self.evaluations = 0  # patched or damaged evaluations so far (progress)
        self._peaks: dict[str, torch.Tensor] = {}

    @property
    def n_blocks(self) -> int:
        return len(self.layer_list)

    def block_output(self, layer: int, call: int) -> torch.Tensor:
        return output_tensor(self.replay.outputs[layer][call])

    def block_values(self, layer: int, channels: torch.Tensor | None):
        """Patch value: the clean output of block ``layer`` (its ``channels``)."""
        def value(call: int, output: torch.Tensor) -> torch.Tensor:
            tensor = self.block_output(layer, call)
            return tensor if channels is None else tensor[..., channels.to(tensor.device)]
        return value

    def restore(self, module_name: str, channels: list[int] | None, positions=None) -> Patch:
        """Patch: ``channels`` of the module's output back to the clean run's values."""
        index = None if channels is None else torch.tensor(channels)
        return Patch(self.modules[module_name], index,
                     clean_values(self.outputs[module_name], index), positions)

    def restore_block(self, layer: int, channels: list[int] | None) -> Patch:
        index = None if channels is None else torch.tensor(channels)
        return Patch(self.layer_list[layer], index, self.block_values(layer, index))

    def evaluate(self, layer: int | None, patches=(), replay: LayerReplay | None = None):
        """Evaluated from block ``layer`` on (None: in full) with ``patches`` applied, through
        ``replay``'s recording (default: the clean one)."""
        self.evaluations += 1
        with patched(list(patches)):
            return (replay or self.replay).evaluate_from(layer)

    @contextmanager
    def zeroed(self, selection):
        """The selected weights zeroed; their exact bits restored on exit."""
        params = {name: self.params[name] for name in selection}
        with perturbed(params, selection, "zero"):
            yield

    def damaged_replay(self) -> LayerReplay:
        """A recording of the model as it is now (call inside ``zeroed``)."""
        return LayerReplay(self.model, self.blocks, self.batch_size, self.layer_list, self.ranks)

    def channel_peaks(self, module_name: str) -> torch.Tensor:
        """Per output channel, the peak |clean output| over real tokens (computed once)."""
        if module_name not in self._peaks:
            self._peaks[module_name] = self._channel_peaks(module_name)
        return self._peaks[module_name]

    def _channel_peaks(self, module_name: str) -> torch.Tensor:
        peaks = torch.stack([torch.where(mask[..., None], out.abs().float(), 0.0).amax((0, 1))
                             for out, mask in zip(self.outputs[module_name], self.masks)])
        return self.ranks.reduced([peaks.amax(0)], "max")[0].float()


def calibration_means(model, ranks, blocks, batch_size: int, module_names) -> dict:
    """Per module, the mean output of every channel over the real tokens of ``blocks``."""
    modules = dict(model.named_modules())
    with Recorder({name: modules[name] for name in dict.fromkeys(module_names)}) as recorder:
        evaluate(model, blocks, batch_size, ranks=ranks)
    batches = [i for i in ranks.my_batches(-(-len(blocks) // batch_size)) if i is not None]
    masks = [blocks.batch(i, batch_size)[1].bool() for i in batches]
    means = {}
    for name, outputs in recorder.outputs.items():
        sums = sum(torch.where(m[..., None], o.double(), 0.0).sum((0, 1))
                   for o, m in zip(outputs, masks))
        count = torch.tensor([float(sum(int(m.sum()) for m in masks))], dtype=torch.float64)
        total = ranks.reduced([torch.cat([sums, count])])[0]
        means[name] = (total[:-1] / total[-1]).float()
    return means
