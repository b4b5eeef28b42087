"""The bits a hardware fault can hit (``--bit-format``), and single-bit flips of them.

Formats (``FORMATS``):

* ``native``: the IEEE-754 bits of the stored dtype (bit 0 = least significant mantissa bit);
* ``int8`` / ``int4``: every weight held as a round-to-nearest integer code of b bits with
  per-group scales (src/sensitivity/quantize.py: --quant-group, --quant-symmetric), the model
  evaluated on the dequantized values. A flip changes one bit of one code: two's complement for
  symmetric codes (bit b-1 is the sign: flipping it in code 1 of int8 gives -127), unsigned with
  a zero point otherwise. Codes are kept as their b-bit patterns (one byte per weight). A group
  whose weights are all equal has scale 0 and decodes to that value whatever its codes: a flip
  there changes nothing.

``held_as(params, metas, format, spec)`` is a context manager that yields one ``TensorBits`` per
parameter; for an integer format it writes the dequantized values into the weights and restores
the original bits on exit (also on an error or a signal). ``TensorBits.flipped(idx, bits)``
gives the values the weights at flat indices ``idx`` (stored layout) take when bit ``bits`` of
each is flipped; ``write`` puts values in place (and updates the codes).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from src.errors import UserError
from src.models.components import ParamMeta
from src.sensitivity.perturb import FLOAT_LAYOUT, resolve_bit, xor_bit
from src.sensitivity.quantize import QuantSpec, backup, dequantize, quantize_codes
from src.utils import signals

FORMATS = {"native": None, "int8": 8, "int4": 4}


class NativeBits:
    """The IEEE-754 bits of one weight tensor, as stored."""

    def __init__(self, param: torch.nn.Parameter):
        self.flat = param.data.view(-1)
        _, self.sign_bit, self.exponent_msb, self.mantissa_msb = FLOAT_LAYOUT[param.dtype]
        self.n_bits = self.sign_bit + 1
        self.most_damaging_bit = self.exponent_msb

    def resolve(self, bit) -> int:
        return resolve_bit(bit, self.flat.dtype)

    def current(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.flat if idx is None else self.flat[idx]

    def flipped(self, idx: torch.Tensor | None, bits) -> torch.Tensor:
        """Values at ``idx`` (None: every weight) with bit ``bits`` (int or per-index tensor)
        flipped, in the weight's dtype."""
        return xor_bit(self.current(idx), bits)

    def change_bounds(self) -> list[float]:
        """Per bit, an upper bound of |w' - w| over the tensor when that bit flips: a mantissa
        bit b moves |w| = 2^E(1 + f) by 2^E·2^(b - m) <= max(|w|, tiny)·2^(b - m); the sign
        2|w|; exponent bit k multiplies by at most 2^(2^k) (a subnormal gets at most
        2^(2^k - bias + 1)) or divides."""
        info = torch.finfo(self.flat.dtype)
        largest = float(self.flat.abs().max()) if self.flat.numel() else 0.0
        m = self.mantissa_msb + 1              # mantissa bits
        bias = (1 << (self.sign_bit - m - 1)) - 1
        bounds = [max(largest, info.tiny) * 2.0 ** (b - m) for b in range(m)]
        for k in range(self.sign_bit - m):
            bounds.append(largest + max(_times_power_of_two(largest, 1 << k),
                                        _times_power_of_two(2.0, (1 << k) - bias)))
        return bounds + [2 * largest]

    def gain_bounds(self, g: torch.Tensor) -> list[float]:
        """Per bit, an upper bound of |g·(w' - w)| over the tensor (``g`` flat)."""
        g_max = float(g.abs().max())
        return [g_max * bound for bound in self.change_bounds()]

    def changes(self, bit: int) -> torch.Tensor:
        """w' - w (float32, flat) when ``bit`` of every weight flips; non-finite where w' is."""
        return self.flipped(None, bit).float() - self.flat.float()

    def apply(self, idx: torch.Tensor, bits):
        """Flip bit ``bits`` of each weight at ``idx`` (distinct indices) in place; returns what
        ``restore`` needs."""
        saved = self.flat[idx].clone()
        self.flat[idx] = self.flipped(idx, bits)
        return saved

    def restore(self, idx: torch.Tensor, saved) -> None:
        self.flat[idx] = saved


class IntBits:
    """One weight tensor held as b-bit integer codes with per-group scales."""

    def __init__(self, param: torch.nn.Parameter, meta: ParamMeta, spec: QuantSpec):
        self.flat, self.meta = param.data.view(-1), meta
        self.n_bits = spec.bits
        self.most_damaging_bit = spec.bits - 1
        self.signed = spec.scheme == "symmetric"
        stored = param.detach()
        out_in = stored.T if meta.transposed else stored.reshape(stored.shape[0], -1)
        codes = quantize_codes(out_in, spec)
        self.scale, self.zero, self.fallback = codes.scale, codes.zero, codes.fallback
        self.n_out, self.n_in = out_in.shape
        self.group = codes.q.shape[-1]
        self.patterns = self._pattern(codes.q).to(torch.uint8).reshape(self.n_out, -1)
        del codes
        self.flat.copy_(self._stored(self.decode(self.patterns)).reshape(-1))

    def resolve(self, bit) -> int:
        return resolve_code_bit(bit, self.n_bits, self.signed)

    # --------------------------------------------------------------- codes
    def _pattern(self, q: torch.Tensor) -> torch.Tensor:
        """b-bit pattern (int64) of integer codes (two's complement when signed)."""
        return torch.remainder(q.long(), 1 << self.n_bits)

    def _code(self, pattern: torch.Tensor) -> torch.Tensor:
        value = pattern.long()
        if self.signed:
            value = torch.where(value >= 1 << (self.n_bits - 1), value - (1 << self.n_bits), value)
        return value.float()

    def decode(self, patterns: torch.Tensor) -> torch.Tensor:
        """float32 [out, in] values of [out, padded in] patterns."""
        q = self._code(patterns).view(self.n_out, -1, self.group)
        values = dequantize(q, self.scale, self.zero, self.fallback)
        return values.reshape(self.n_out, -1)[:, :self.n_in]

    def _stored(self, out_in: torch.Tensor) -> torch.Tensor:
        values = out_in.T if self.meta.transposed else out_in
        return values.reshape(self.meta.stored_shape).to(self.flat.dtype)

    def _out_in(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.meta.transposed:  # stored [in, out]
            return idx % self.n_out, idx // self.n_out
        return idx // self.n_in, idx % self.n_in

    # --------------------------------------------------------------- flips
    def current(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.flat if idx is None else self.flat[idx]

    def change_bounds(self) -> list[float]:
        """Per bit b, an upper bound of |w' - w|: the code moves by 2^b, the value by 2^b·scale,
        give or take the rounding of both values to the weight's dtype."""
        largest = float(self.scale.max()) if self.scale.numel() else 0.0
        rounding = 2 * torch.finfo(self.flat.dtype).eps * (
            float(self.flat.abs().max()) + largest * 2 ** self.n_bits)
        return [largest * 2.0 ** b + rounding for b in range(self.n_bits)]

    def gain_bounds(self, g: torch.Tensor) -> list[float]:
        """Per bit b, an upper bound of |g·(w' - w)|: 2^b·max|g·scale| and the rounding."""
        g_scaled = float((self._out_in_layout(g).abs().view(self.n_out, -1, self.group)
                          * self.scale).max()) if g.numel() else 0.0
        rounding = self.change_bounds()[0] - float(self.scale.max())
        return [g_scaled * 2.0 ** b + float(g.abs().max()) * rounding for b in range(self.n_bits)]

    def changes(self, bit: int) -> torch.Tensor:
        """w' - w (float32, flat, stored layout) when ``bit`` of every code flips: the code moves
        by ±2^b (the sign of two's complement's top bit reversed), the value by that times the
        group's scale (0 where the scale is 0)."""
        was_set = ((self.patterns >> bit) & 1).float()
        step = (1.0 - 2.0 * was_set).mul_(float(1 << bit))
        if self.signed and bit == self.n_bits - 1:
            step.neg_()
        delta = (step.view(self.n_out, -1, self.group) * self.scale).reshape(self.n_out, -1)
        delta = delta[:, :self.n_in]
        return (delta.T if self.meta.transposed else delta).reshape(-1)

    def _out_in_layout(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat stored-layout tensor as [out, padded in] (zeros in the padding)."""
        stored = flat.view(self.meta.stored_shape)
        out_in = stored.T if self.meta.transposed else stored.reshape(self.n_out, -1)
        return torch.nn.functional.pad(out_in, (0, self.patterns.shape[1] - self.n_in))

    def code_patterns(self, idx: torch.Tensor) -> torch.Tensor:
        rows, cols = self._out_in(idx)
        return self.patterns[rows, cols]

    def flipped(self, idx: torch.Tensor | None, bits) -> torch.Tensor:
        """Values at ``idx`` (None: every weight, ``bits`` an int) with bit ``bits`` of their
        codes flipped, in the weight's dtype."""
        if idx is None:
            patterns = self.patterns.long() ^ (1 << int(bits))
            return self._stored(self.decode(patterns)).reshape(-1)
        return self._decode_at(idx, self._flipped_patterns(idx, bits))

    def _flipped_patterns(self, idx: torch.Tensor, bits) -> torch.Tensor:
        mask = torch.bitwise_left_shift(torch.ones_like(idx), torch.as_tensor(bits).to(idx))
        return self.code_patterns(idx).long() ^ mask

    def _decode_at(self, idx: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
        rows, cols = self._out_in(idx)
        groups = cols // self.group
        values = dequantize(self._code(patterns), self.scale[rows, groups, 0],
                            self.zero[rows, groups, 0], self.fallback[rows, groups, 0])
        return values.to(self.flat.dtype)

    def apply(self, idx: torch.Tensor, bits):
        """Flip bit ``bits`` of the codes at ``idx`` (distinct indices) in place; returns what
        ``restore`` needs."""
        rows, cols = self._out_in(idx)
        saved = (self.flat[idx].clone(), self.patterns[rows, cols].clone())
        patterns = self._flipped_patterns(idx, bits)
        self.flat[idx] = self._decode_at(idx, patterns)
        self.patterns[rows, cols] = patterns.to(torch.uint8)
        return saved

    def restore(self, idx: torch.Tensor, saved) -> None:
        rows, cols = self._out_in(idx)
        self.flat[idx], self.patterns[rows, cols] = saved


def resolve_code_bit(bit, n_bits: int, signed: bool) -> int:
    """Bit number of a b-bit code for a number, ``msb`` or (signed codes) ``sign``."""
    named = {"msb": n_bits - 1, **({"sign": n_bits - 1} if signed else {})}
    if isinstance(bit, str) and bit in named:
        return named[bit]
    try:
        number = int(bit)
    except (TypeError, ValueError):
        kind = "symmetric two's complement" if signed else "unsigned (zero point)"
        raise UserError(f"bit position '{bit}' does not name a bit of {n_bits}-bit {kind} "
                        f"codes: give 0..{n_bits - 1}, {', '.join(named)}") from None
    if not 0 <= number < n_bits:
        raise UserError(f"bit position {number} is outside 0..{n_bits - 1} for int{n_bits} codes")
    return number


def check_bit(bit, bit_format: str, symmetric: bool, dtypes) -> str | None:
    """Why ``bit`` names no bit of weights of ``dtypes`` in ``bit_format``, or None."""
    try:
        if FORMATS[bit_format] is None:
            for dtype in set(dtypes):
                resolve_bit(bit, dtype)
        else:
            resolve_code_bit(bit, FORMATS[bit_format], symmetric)
    except UserError as error:
        return f"bad --bit-position: {error}"
    return None


def _times_power_of_two(value: float, exponent: int) -> float:
    try:
        return math.ldexp(value, exponent)
    except OverflowError:
        return math.inf


def format_problem(bit_format: str, dtypes) -> str | None:
    """Why weights of these dtypes cannot take faults in ``bit_format``, or None."""
    for dtype in set(dtypes):
        if dtype not in FLOAT_LAYOUT:
            what = "IEEE-754 bits" if bit_format == "native" else "dequantized values"
            return f"--bit-format {bit_format} needs float weights for their {what}, not {dtype}"
    return None


@contextmanager
def held_as(params: dict[str, torch.nn.Parameter], metas: dict[str, ParamMeta],
            bit_format: str, spec: QuantSpec | None):
    """name -> TensorBits for every weight of ``params`` in ``bit_format``. An integer format
    quantizes the weights in place (codes from ``spec``, its bits those of the format) and
    restores their original bits on exit."""
    if bit_format == "native":
        yield {name: NativeBits(p) for name, p in params.items()}
        return
    originals = backup(params)
    written = []
    try:
        targets = {}
        with torch.no_grad():
            for name, p in params.items():
                written.append(name)
                targets[name] = IntBits(p, metas[name], spec)
        yield targets
    finally:
        with signals.deferred(), torch.no_grad():
            for name in written:
                params[name].data.copy_(originals[name].to(params[name].device))


def quant_spec(bit_format: str, group: int | None, symmetric: bool) -> QuantSpec | None:
    bits = FORMATS[bit_format]
    return None if bits is None else QuantSpec(bits, group,
                                               "symmetric" if symmetric else "asymmetric")
