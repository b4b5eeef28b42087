"""Simulated round-to-nearest quantization of every scored weight, except the weights kept.

Groups: ``group`` consecutive input weights of one output row ([out, in] coordinates, so GPT-2's
Conv1D weights are grouped along their stored rows' transposes), the last group of a row shorter
when ``group`` does not divide the row length (a row of 64 inputs in groups of 48: one group of 48
and a last one of 16, each with its own range; a row shorter than ``group`` is one group);
``group=None`` is one group per output row. ``row_groups`` says how the rows of a model divide.
Kept weights keep their original values and are left out of their group's range (a
dense-and-sparse split).

Schemes (``SCHEMES``; b = bits, over the group's non-kept weights w):

* ``asymmetric`` (min-max with a zero point): scale = (max w - min w) / (2^b - 1),
  zero = round(-min w / scale), q = clamp(round(w / scale) + zero, 0, 2^b - 1),
  w' = (q - zero) * scale;
* ``symmetric`` (absmax): scale = max |w| / (2^(b-1) - 1), q = clamp(round(w / scale),
  -(2^(b-1) - 1), 2^(b-1) - 1), w' = q * scale.

A group whose non-kept weights are all equal keeps that value exactly (scale 0). The arithmetic
is float32, the result is written back in the weight's dtype (the standard way to measure the
quality of a quantized model). ``quantized(...)`` quantizes in place one tensor at a time and
restores the exact original bits on exit, also on an error or a signal; the originals are kept
once, off the accelerator when they would not fit beside the model.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from src.models.components import ParamMeta
from src.sensitivity.rank import Selection
from src.distributed.sharding import local, local_rows
from src.utils import signals


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group: int | None = 128   # None: one group per output row
    scheme: str = "asymmetric"

    @property
    def label(self) -> str:
        grouping = "row" if self.group is None else f"g{self.group}"
        return f"rtn{self.bits}-{grouping}-{self.scheme}"


def row_groups(metas: dict[str, ParamMeta], spec: QuantSpec) -> list[dict]:
    """How the rows of these weights divide into groups, per distinct row length (inputs):
    {row_length, full_groups (of ``spec.group`` inputs), last_group (the shorter last group's
    size; 0 when the group size divides the row)}."""
    lengths = sorted({math.prod(meta.shape_out_in[1:]) for meta in metas.values()})
    return [{"row_length": n_in, "full_groups": n_in // (spec.group or n_in),
             "last_group": n_in % (spec.group or n_in)} for n_in in lengths]


@dataclass
class Codes:
    """Round-to-nearest integer codes of a [out, in] weight, with what decodes them: value =
    (q - zero) * scale where scale > 0, else ``fallback`` (a group whose weights are all equal:
    its value exactly; 0 for symmetric). ``q``: float32 [out, n_groups, group] holding integers
    (0..2^b - 1 with a zero point; -(2^(b-1) - 1)..2^(b-1) - 1 symmetric), padded to whole
    groups; ``scale``, ``zero``, ``fallback``: float32 [out, n_groups, 1]."""
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    fallback: torch.Tensor
    n_in: int

    def decode(self, q: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [out, in] values of codes ``q`` (default: the codes themselves)."""
        values = dequantize(self.q if q is None else q, self.scale, self.zero, self.fallback)
        return values.reshape(values.shape[0], -1)[:, :self.n_in]


def dequantize(q, scale, zero, fallback) -> torch.Tensor:
    """(q - zero) * scale where scale > 0, else ``fallback`` (float32, broadcast)."""
    safe = torch.where(scale > 0, scale, 1.0)
    return torch.where(scale > 0, (q - zero) * safe, fallback)


def _asymmetric(w, valid, bits):
    low = torch.where(valid, w, math.inf).amin(-1, keepdim=True)
    high = torch.where(valid, w, -math.inf).amax(-1, keepdim=True)
    scale = (high - low) / (2 ** bits - 1)
    safe = torch.where(scale > 0, scale, 1.0)
    zero = torch.round(-low / safe)
    q = torch.clamp(torch.round(w / safe) + zero, 0, 2 ** bits - 1)
    return q, scale, zero, low


def _symmetric(w, valid, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = torch.where(valid, w.abs(), 0.0).amax(-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, 1.0)
    q = torch.clamp(torch.round(w / safe), -qmax, qmax)
    return q, scale, torch.zeros_like(scale), torch.zeros_like(scale)


SCHEMES = {"asymmetric": _asymmetric, "symmetric": _symmetric}


def quantize_codes(weight: torch.Tensor, spec: QuantSpec,
                   keep: torch.Tensor | None = None) -> Codes:
    """The codes of a [out, in] weight (``keep``: bool mask of weights left out of the
    groups' ranges)."""
    w = weight.float()
    n_out, n_in = w.shape
    size = n_in if spec.group is None else spec.group
    n_groups = math.ceil(n_in / size)
    pad = n_groups * size - n_in
    valid = torch.ones_like(w, dtype=torch.bool) if keep is None else ~keep
    w_groups = torch.nn.functional.pad(w, (0, pad)).view(n_out, n_groups, size)
    valid_groups = torch.nn.functional.pad(valid, (0, pad), value=False).view(n_out, n_groups,
                                                                              size)
    q, scale, zero, fallback = SCHEMES[spec.scheme](w_groups, valid_groups, spec.bits)
    return Codes(q, scale, zero, fallback, n_in)


def quantize_out_in(weight: torch.Tensor, spec: QuantSpec,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantized float32 values of a [out, in] weight (``keep``: bool mask of weights that
    keep their value and stay out of the ranges)."""
    out = quantize_codes(weight, spec, keep).decode()
    return out if keep is None else torch.where(keep, weight.float(), out)


def quantize_stored(param: torch.Tensor, meta: ParamMeta, spec: QuantSpec,
                    keep_flat: torch.Tensor | None) -> torch.Tensor:
    """The quantized tensor in the parameter's stored layout and dtype."""
    stored = param.detach()
    keep = None
    if keep_flat is not None and keep_flat.numel():
        keep = torch.zeros(stored.numel(), dtype=torch.bool, device=stored.device)
        keep[keep_flat.to(stored.device)] = True
        keep = keep.view(stored.shape)
    if meta.transposed:  # GPT-2 Conv1D: stored [in, out]
        result = quantize_out_in(stored.T, spec, None if keep is None else keep.T).T
    else:
        result = quantize_out_in(stored.reshape(stored.shape[0], -1), spec,
                                 None if keep is None else keep.reshape(stored.shape[0], -1))
    return result.reshape(stored.shape).to(stored.dtype)


def changed_by(params: dict[str, torch.nn.Parameter], metas: dict[str, ParamMeta],
               spec: QuantSpec):
    """name -> bool mask (this process's part of the weight) of the weights that round-to-nearest
    changes in value (a weight on the grid, such as a 0 in a group with a zero point, stays)."""
    def changes(name: str) -> torch.Tensor:
        held = local(params[name]).detach()
        return quantize_stored(held, metas[name], spec, None) != held
    return changes


BACKUP_HEADROOM = 1.5  # the copy stays on a GPU only with this much of its size free beside it


def backup(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """One copy of the weights: on each GPU that has room for it beside the model and the
    quantization temporaries, else on the CPU."""
    on_device = {}
    for device in {p.device for p in params.values() if p.is_cuda}:
        size = sum(p.numel() * p.element_size() for p in params.values() if p.device == device)
        on_device[device] = torch.cuda.mem_get_info(device)[0] > BACKUP_HEADROOM * size
    return {name: local(p).detach().clone() if on_device.get(p.device) else
            local(p).detach().to("cpu", copy=True) for name, p in params.items()}


@contextmanager
def quantized(params: dict[str, torch.nn.Parameter], metas: dict[str, ParamMeta],
              spec: QuantSpec, keep: Selection, originals: dict[str, torch.Tensor],
              layout=None):
    """Every weight of ``params`` quantized in place except ``keep``; ``originals`` (from
    ``backup``) restored bit-exactly on exit. ``layout`` (sharding.Layout): each process
    quantizes the rows it holds (whole groups: see ``shard_problem``)."""
    touched = []
    try:
        with torch.no_grad():
            for name, p in params.items():
                held, kept = local(p), keep.get(name)
                if layout is not None and kept is not None:
                    kept = layout.localize(name, held.numel(), kept.cpu())[1]
                touched.append(name)
                held.data.copy_(quantize_stored(held, metas[name], spec, kept))
        yield
    finally:
        with signals.deferred(), torch.no_grad():
            for name in touched:
                held = local(params[name])
                held.data.copy_(originals[name].to(held.device))


def shard_problem(params: dict, metas: dict[str, ParamMeta], spec: QuantSpec) -> str | None:
    """Why these sharded weights cannot be quantized rows-locally, or None. A process holds
    whole stored rows; a Conv1D weight's stored rows are inputs, grouped along, so its row
    ranges must start and end on group boundaries."""
    for name, p in params.items():
        if not metas[name].transposed:
            continue
        rows = local_rows(p)
        if spec.group is None or rows.start % spec.group or \
                (rows.stop % spec.group and rows.stop != p.shape[0]):
            return (f"--quantize under --shard: {name} is stored [in, out] and this process "
                    f"holds inputs {rows.start}..{rows.stop - 1}, which split a quantization "
                    f"group; use a --quant-group that divides {len(rows)}, or fewer processes")
    return None
