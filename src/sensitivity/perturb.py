"""Perturbations of selected weights, applied in a context manager that restores exact bits.

Registry ``PERTURBATIONS``: name -> function(values, generator, options) -> new values, where
``values`` are the selected weights (1-D, in the parameter's dtype):

* ``zero``        w -> 0
* ``sign_flip``   w -> -w
* ``gauss_noise`` w -> w + ε, ε ~ N(0, (s·|w|)²), s = ``perturb_scale`` (relative noise)
* ``bit_flip``    XOR of one IEEE-754 bit on the integer view of the dtype (fp64 / fp32 / bf16 /
                  fp16),
                  each selected weight flipped with probability ``perturb_prob``.
                  ``bit_position`` is a number (0 = least significant mantissa bit) or ``sign`` /
                  ``exponent-msb`` / ``mantissa-msb``; None (not given): ``exponent-msb``.

``options`` is a ``PerturbOptions``: the perturbations' flags (src/options.py), named in their
``register(..., settings=PerturbOptions)``; a new option is a field of it.

Each entry also says which weights it can change in value (``changes(values, options)`` -> bool
mask): every nonzero weight for ``zero``, ``sign_flip`` and ``gauss_noise`` (0, -0 and 0 + 0·ε are
all 0), and for ``bit_flip`` every weight, or every nonzero one when the bit is the sign. The
bottom-K control is drawn among those weights (``changed_by``), so that it measures damage
instead of repeating the value a weight already has.

``perturbed(params, selection, method, ...)`` saves the original values of exactly the selected
weights (no model copy), writes the perturbed values, and restores the saved values on exit,
also on an exception, Ctrl-C, SIGTERM or SIGHUP; signals that arrive during the restore wait
until it is complete.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from src.errors import UserError
from src.options import Settings, number, option, text
from src.sensitivity.rank import Selection
from src.utils.seeds import generator_for
from src.distributed.sharding import local
from src.utils import signals

# dtype -> (integer view, sign bit, exponent MSB, mantissa MSB)
FLOAT_LAYOUT = {
    torch.float64: (torch.int64, 63, 62, 51),
    torch.float32: (torch.int32, 31, 30, 22),
    torch.bfloat16: (torch.int16, 15, 14, 6),
    torch.float16: (torch.int16, 15, 14, 9),
}
BIT_NAMES = ("sign", "exponent-msb", "mantissa-msb")
DEFAULT_BIT = "exponent-msb"  # bit_flip's bit when --bit-position is not given


@dataclass(frozen=True)
class PerturbOptions(Settings):
    """The perturbations' flags (--perturb itself is a RunConfig field)."""
    AFTER = "controls"
    perturb_scale: float = option(0.1, "gauss_noise: noise sd relative to |w|",
                                  group="perturbation", parse=number(0.0),
                                  used_when=("--perturb gauss_noise",
                                             lambda c: c.perturb == "gauss_noise"))
    bit_position: str | int | None = option(
        None, "sign, exponent-msb, mantissa-msb or a bit number (0 = least significant; int "
        "codes: a number, msb, sign); bit_flip flips it (default exponent-msb), "
        "--fault-injection draws only it (default every bit)", group="perturbation", parse=text,
        show_default=False,
        used_when=("--perturb bit_flip or --fault-injection",
                   lambda c: c.perturb == "bit_flip" or bool(c.value("fault_injection"))))
    perturb_prob: float = option(1.0, "bit_flip: probability of flipping each selected weight",
                                 group="perturbation", parse=number(0.0, 1.0),
                                 used_when=("--perturb bit_flip",
                                            lambda c: c.perturb == "bit_flip"))

    def problems(self, config):
        if config.perturb == "bit_flip":
            try:
                resolve_bit(self.bit_position, torch.float32)
            except UserError as error:
                yield f"bad --bit-position: {error}"

    def recorded(self) -> dict:
        """The options as the results files name them (perturbation_results.json,
        enhanced_analysis.json: the names from before they were flags, scale, bit, prob), the
        bit as bit_flip resolves its default."""
        bit = DEFAULT_BIT if self.bit_position is None else self.bit_position
        values = {**vars(self), "bit_position": bit}
        return {RECORDED_NAMES.get(name, name): value for name, value in values.items()}


RECORDED_NAMES = {"perturb_scale": "scale", "bit_position": "bit", "perturb_prob": "prob"}


def _nonzero(values: torch.Tensor, options: PerturbOptions) -> torch.Tensor:
    return values != 0


@dataclass(frozen=True)
class Perturbation:
    fn: Callable
    description: str
    stochastic: Callable[[PerturbOptions], bool]
    changes: Callable[[torch.Tensor, PerturbOptions], torch.Tensor] = _nonzero
    settings: type | None = None  # the settings class whose fields it reads: PerturbOptions


PERTURBATIONS: dict[str, Perturbation] = {}


def register(name, description, stochastic=lambda options: False, changes=_nonzero,
             settings=None):
    def wrap(fn):
        PERTURBATIONS[name] = Perturbation(fn, description, stochastic, changes, settings)
        return fn
    return wrap


@register("zero", "set to 0")
def _zero(values, generator, options):
    return torch.zeros_like(values)


@register("sign_flip", "negate")
def _sign_flip(values, generator, options):
    return -values


@register("gauss_noise", "add N(0, (scale*|w|)^2) noise", stochastic=lambda o: True,
          settings=PerturbOptions)
def _gauss_noise(values, generator, options):
    noise = torch.randn(values.shape, generator=generator, device=values.device)
    return (values.float() + noise * options.perturb_scale * values.float().abs()).to(values.dtype)


def _bit_flip_changes(values: torch.Tensor, options: PerturbOptions) -> torch.Tensor:
    """A flipped sign leaves 0 equal to 0; any other bit changes every value."""
    if resolve_bit(options.bit_position, values.dtype) == FLOAT_LAYOUT[values.dtype][1]:
        return values != 0
    return torch.ones_like(values, dtype=torch.bool)


@register("bit_flip", "flip one IEEE-754 bit", stochastic=lambda o: o.perturb_prob < 1.0,
          changes=_bit_flip_changes, settings=PerturbOptions)
def _bit_flip(values, generator, options):
    flipped = xor_bit(values, resolve_bit(options.bit_position, values.dtype))
    if options.perturb_prob < 1.0:
        chosen = torch.rand(values.shape, generator=generator, device=values.device) < \
            options.perturb_prob
        return torch.where(chosen, flipped, values)
    return flipped


def xor_bit(values: torch.Tensor, bits) -> torch.Tensor:
    """``values`` with IEEE-754 bit ``bits`` (an int, or a tensor of one per value) flipped: XOR
    on the integer view of the dtype."""
    int_dtype = FLOAT_LAYOUT[_check_float(values.dtype)][0]
    as_int = values.view(int_dtype)
    one = torch.ones((), dtype=int_dtype, device=as_int.device)
    # 1 << (width - 1) wraps to the integer minimum: exactly the sign bit's mask
    mask = torch.bitwise_left_shift(one, torch.as_tensor(bits, device=as_int.device).to(int_dtype))
    return (as_int ^ mask).view(values.dtype)


def _check_float(dtype):
    if dtype not in FLOAT_LAYOUT:
        raise UserError(f"bit flips need float64, float32, bfloat16 or float16 weights, "
                        f"not {dtype}")
    return dtype


def resolve_bit(bit, dtype) -> int:
    """Bit number for a name or number, validated for ``dtype``."""
    int_dtype, sign, exponent_msb, mantissa_msb = FLOAT_LAYOUT[_check_float(dtype)]
    bit = DEFAULT_BIT if bit is None else bit
    named = {"sign": sign, "exponent-msb": exponent_msb, "mantissa-msb": mantissa_msb}
    if isinstance(bit, str) and bit in named:
        return named[bit]
    try:
        number = int(bit)
    except (TypeError, ValueError):
        raise UserError(f"bit position '{bit}' is neither a number nor one of "
                        f"{', '.join(BIT_NAMES)}") from None
    if not 0 <= number <= sign:
        raise UserError(f"bit position {number} is outside 0..{sign} for {dtype}")
    return number


def perturbation_is_stochastic(method: str, options: PerturbOptions) -> bool:
    return PERTURBATIONS[method].stochastic(options)


def changed_by(method: str, options: PerturbOptions, params) -> Callable[[str], torch.Tensor]:
    """name -> bool mask (this process's part of the weight) of the weights ``method`` changes
    in value."""
    changes = PERTURBATIONS[method].changes
    return lambda name: changes(local(params[name]).detach(), options)


@contextmanager
def perturbed(params: dict[str, torch.nn.Parameter], selection: Selection, method: str,
              options: PerturbOptions = PerturbOptions(), seed: int = 0, layout=None):
    """Apply ``method`` to the selected weights; restore their exact bits on exit. Random draws
    (noise, which bits flip) come from a stream per (seed, parameter name). ``layout``
    (sharding.Layout): the weights are sharded and ``selection`` holds full-tensor indices;
    each rank changes the values it holds, drawn as one process would draw them."""
    if method not in PERTURBATIONS:
        raise UserError(f"unknown perturbation '{method}'; choose one of {', '.join(PERTURBATIONS)}")
    fn = PERTURBATIONS[method].fn
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    selected = selection if layout is None else _selected_values(params, selection, layout)
    try:
        with torch.no_grad():
            for name, idx in selection.items():
                flat = local(params[name]).data.view(-1)
                generator = generator_for(flat.device, seed, name)
                if layout is None:
                    idx = idx.to(flat.device)
                    saved[name] = (idx, flat[idx].clone())
                    flat[idx] = fn(saved[name][1].clone(), generator, options)
                    continue
                held, local_idx = layout.localize(name, flat.numel(), idx)
                local_idx = local_idx.to(flat.device)
                saved[name] = (local_idx, flat[local_idx].clone())
                changed = fn(selected[name].to(flat.device, flat.dtype), generator, options)
                flat[local_idx] = changed[held.to(flat.device)]
        yield
    finally:
        with signals.deferred(), torch.no_grad():  # a second Ctrl-C cannot cut the restore short
            for name, (idx, original) in saved.items():
                local(params[name]).data.view(-1)[idx] = original


def _selected_values(params, selection: Selection, layout) -> dict[str, torch.Tensor]:
    """The selected weights' values, every one on every rank (float64 holds each exactly)."""
    return layout.values_at({name: (local(params[name]), idx) for name, idx in selection.items()})


def fingerprint(params: dict[str, torch.nn.Parameter]) -> list[int]:
    """Checksum of each tensor's bits (int64 sum of the integer view); one host sync in all."""
    sums = [local(p).detach().view(FLOAT_LAYOUT[_check_float(p.dtype)][0]).sum(dtype=torch.int64)
            for p in params.values()]
    return torch.stack([s.cpu() for s in sums]).tolist()


def selected_bits_equal(params, selection: Selection, reference: dict[str, torch.Tensor]) -> bool:
    """True when the selected weights' bits equal ``reference`` (saved before perturbing)."""
    for name, idx in selection.items():
        values = local(params[name]).detach().view(-1)
        current = values[idx.to(values.device)]
        int_dtype = FLOAT_LAYOUT[current.dtype][0]
        if not torch.equal(current.view(int_dtype), reference[name].to(current.device).view(int_dtype)):
            return False
    return True


def count_changed(params, selection: Selection, before: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many selected weights differ in value from ``before`` (0-dim int64 on the CPU; one
    host sync). -0 equals 0; a NaN counts as changed."""
    counts = [(local(params[name]).detach().view(-1)[idx.to(before[name].device)]
               != before[name]).sum() for name, idx in selection.items()]
    return torch.stack([c.cpu() for c in counts]).sum() if counts else torch.zeros((), dtype=torch.long)


def snapshot_selected(params, selection: Selection) -> dict[str, torch.Tensor]:
    values = {name: local(params[name]).detach().view(-1) for name in selection}
    return {name: values[name][idx.to(values[name].device)].clone()
            for name, idx in selection.items()}


def held_part(params, selection: Selection, layout) -> Selection:
    """The local flat indices of the selected weights this rank holds (sharded weights)."""
    return {name: layout.localize(name, local(params[name]).numel(), idx.cpu())[1]
            for name, idx in selection.items()}
