"""Bit targets of hardware faults: IEEE bits of the stored dtype and the bits of RTN integer
codes, against struct/numpy references and an independent RTN written here."""
import struct

import numpy as np
import pytest
import torch

from src.errors import UserError
from src.models.components import ParamMeta
from src.sensitivity.bit_targets import IntBits, NativeBits, held_as
from src.sensitivity.quantize import QuantSpec


def rtn_reference(w: np.ndarray, bits: int, group: int, symmetric: bool):
    """Per row, per group of ``group`` inputs: (codes, scales, zeros) by the textbook formulas,
    in float64 loops (the tool computes in float32; values agree to float32 rounding)."""
    codes = np.zeros(w.shape, dtype=np.int64)
    scales, zeros = np.zeros(w.shape), np.zeros(w.shape)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[r, start:start + group].astype(np.float64)
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                scale, zero = np.abs(g).max() / qmax, 0.0
                q = np.clip(np.round(g / scale), -qmax, qmax)
            else:
                scale = (g.max() - g.min()) / (2 ** bits - 1)
                zero = np.round(-g.min() / scale)
                q = np.clip(np.round(g / scale) + zero, 0, 2 ** bits - 1)
            codes[r, start:start + group] = q
            scales[r, start:start + group], zeros[r, start:start + group] = scale, zero
    return codes, scales, zeros


def reference_flip(code: int, bit: int, bits: int, symmetric: bool) -> int:
    """A code with one bit flipped, through struct (int8) or nibble arithmetic (int4)."""
    if bits == 8:
        fmt = "b" if symmetric else "B"
        (pattern,) = struct.unpack("B", struct.pack(fmt, code))
        (flipped,) = struct.unpack(fmt, struct.pack("B", pattern ^ (1 << bit)))
        return flipped
    nibble = (code & 0xF) ^ (1 << bit)
    return nibble - 16 if symmetric and nibble >= 8 else nibble


def _weight(rows=6, cols=40, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_int_codes_and_flips_match_references(bits, symmetric, transposed):
    w = _weight()
    stored = w.T.contiguous() if transposed else w.clone()
    param = torch.nn.Parameter(stored)
    meta = ParamMeta("w", 0, "mlp", tuple(stored.shape), transposed)
    target = IntBits(param, meta, QuantSpec(bits, 16, "symmetric" if symmetric else "asymmetric"))
    codes, scales, zeros = rtn_reference(w.numpy(), bits, 16, symmetric)
    dequantized = (codes - zeros) * scales
    values_out_in = param.detach().T if transposed else param.detach()
    np.testing.assert_allclose(values_out_in.numpy(), dequantized, rtol=1e-6, atol=1e-7)

    rng = np.random.default_rng(1)
    for _ in range(40):
        r, c, bit = int(rng.integers(6)), int(rng.integers(40)), int(rng.integers(bits))
        flat = c * 6 + r if transposed else r * 40 + c
        expected_code = reference_flip(int(codes[r, c]), bit, bits, symmetric)
        expected = (expected_code - zeros[r, c]) * scales[r, c]
        got = target.flipped(torch.tensor([flat]), bit)
        np.testing.assert_allclose(got.numpy(), [expected], rtol=1e-6, atol=1e-7)
        before = param.detach().clone()
        saved = target.apply(torch.tensor([flat]), bit)
        assert param.detach().view(-1)[flat] == got[0]
        assert int((param.detach() != before).sum()) <= 1
        target.restore(torch.tensor([flat]), saved)
        assert torch.equal(param.detach(), before)


def test_signed_sign_bit_flip_is_twos_complement():
    param = torch.nn.Parameter(torch.tensor([[1.0, -1.0, 127.0, 0.5]]))
    meta = ParamMeta("w", 0, "mlp", (1, 4), False)
    target = IntBits(param, meta, QuantSpec(8, None, "symmetric"))  # scale 1
    flipped = target.flipped(torch.arange(4), 7)  # codes 1, -1, 127, 0 (0.5 rounds to even)
    assert flipped.tolist() == [-127.0, 127.0, -1.0, -128.0]  # 0x81, 0x7F, 0xFF, 0x80
    assert target.resolve("sign") == 7 and target.resolve("msb") == 7


def test_native_flips_equal_struct_bits():
    values = torch.tensor([0.15625, -2.5, 1e-3, 0.0])
    param = torch.nn.Parameter(values.clone())
    target = NativeBits(param)
    for bit in (0, 22, 30, 31):
        got = target.flipped(None, bit)
        for value, flipped in zip(values.tolist(), got.tolist()):
            (pattern,) = struct.unpack("<I", struct.pack("<f", value))
            (expected,) = struct.unpack("<f", struct.pack("<I", pattern ^ (1 << bit)))
            assert flipped == expected or (np.isnan(flipped) and np.isnan(expected))
    assert target.resolve("exponent-msb") == 30


def test_unsigned_codes_have_no_sign_bit():
    param = torch.nn.Parameter(_weight(2, 8))
    target = IntBits(param, ParamMeta("w", 0, "mlp", (2, 8), False), QuantSpec(4, None))
    with pytest.raises(UserError, match="does not name a bit"):
        target.resolve("sign")
    with pytest.raises(UserError, match="outside 0..3"):
        target.resolve(4)


def test_held_as_int_restores_original_bits():
    params = {"a": torch.nn.Parameter(_weight(4, 32)), "b": torch.nn.Parameter(_weight(3, 32, 1))}
    metas = {n: ParamMeta(n, 0, "mlp", tuple(p.shape), False) for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    with held_as(params, metas, "int4", QuantSpec(4, 8)) as targets:
        assert not torch.equal(params["a"].detach(), before["a"])
        targets["a"].apply(torch.tensor([3]), 2)
    assert all(torch.equal(params[n].detach(), before[n]) for n in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_change_bounds_hold_for_every_bit(dtype):
    """No flip of any bit moves a weight further than its bit's bound (subnormals, zeros and
    values near overflow included)."""
    info = torch.finfo(dtype)
    values = torch.cat([torch.randn(200, generator=torch.Generator().manual_seed(0)),
                        torch.tensor([0.0, -0.0, 1.5, -1.99, 3.0])]).to(dtype)
    values = torch.cat([values, torch.tensor([info.tiny / 4, info.tiny, info.max / 8]).to(dtype)])
    target = NativeBits(torch.nn.Parameter(values))
    bounds = target.change_bounds()
    assert len(bounds) == target.n_bits
    for bit in range(target.n_bits):
        after = target.flipped(None, bit).double()
        change = (after - values.double()).abs()
        finite = torch.isfinite(after)
        assert float(change[finite].max()) <= bounds[bit] * (1 + 1e-12), bit
    int_target = IntBits(torch.nn.Parameter(_weight(4, 32)), ParamMeta("w", 0, "mlp", (4, 32),
                                                                       False), QuantSpec(8, 8))
    for bit, bound in enumerate(int_target.change_bounds()):
        change = (int_target.flipped(None, bit) - int_target.current()).abs()
        assert float(change.max()) <= bound


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_code_changes_and_gain_bounds(symmetric, transposed):
    w = _weight(5, 20, 3)
    stored = w.T.contiguous() if transposed else w.clone()
    meta = ParamMeta("w", 0, "mlp", tuple(stored.shape), transposed)
    target = IntBits(torch.nn.Parameter(stored), meta,
                     QuantSpec(4, 8, "symmetric" if symmetric else "asymmetric"))
    g = torch.randn(stored.numel(), generator=torch.Generator().manual_seed(4))
    bounds = target.gain_bounds(g)
    for bit in range(4):
        exact = target.flipped(None, bit).double() - target.current().double()
        np.testing.assert_allclose(target.changes(bit).numpy(), exact.numpy(), atol=1e-6)
        assert float((exact * g.double()).abs().max()) <= bounds[bit]
