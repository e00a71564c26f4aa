"""Quantizer, bf16 rounding, packing and shrink against their definitions (docs/numerics.md 1-3)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from pmkvq_accel.model import fixedpoint as fp
from pmkvq_accel.model.quant import (QuantizedKV, dequantize, pack_codes, pack_metadata, quantize, shrink,
                                     shrink_codes, shrink_scale, shrink_to, unpack_codes, unpack_metadata)

WIDTHS = (16, 8, 4, 2)


def test_bf16_round_matches_float32_bit_rounding():
    rng = np.random.default_rng(1)
    x = rng.normal(size=100_000) * np.exp2(rng.integers(-60, 60, size=100_000))
    x32 = x.astype(np.float32)  # compare on float32-representable inputs, where RNE on bits is the definition
    bits = x32.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32) << 16
    np.testing.assert_array_equal(fp.bf16_round(x32.astype(np.float64)), rounded.view(np.float32).astype(np.float64))


def _float32_rne_to_bf16(x32):
    bits = x32.view(np.uint32)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def test_bf16_round_ties_and_subnormals():
    """Exact ties (low 16 bits 0x8000) round to even, and the subnormal range (below 2^-126, quantum 2^-133)
    and its boundary round like float32 bit rounding."""
    rng = np.random.default_rng(2)
    hi = rng.integers(0, 1 << 16, size=20_000).astype(np.uint32)
    hi = hi[(hi & 0x7F80) != 0x7F80]                    # no Inf/NaN
    ties = ((hi << 16) | 0x8000).view(np.float32)          # exactly half way, both parities of the upper part
    assert np.any(hi & 1) and np.any(~hi & 1)
    np.testing.assert_array_equal(fp.bf16_round(ties.astype(np.float64)), _float32_rne_to_bf16(ties))
    tiny = (rng.normal(size=50_000) * np.exp2(rng.integers(-140, -118, size=50_000))).astype(np.float32)
    assert np.sum(np.abs(tiny) < 2.0**-126) > 1000 and np.sum(np.abs(tiny) >= 2.0**-126) > 1000
    np.testing.assert_array_equal(fp.bf16_round(tiny.astype(np.float64)), _float32_rne_to_bf16(tiny))


def _sat_rshr(x: int, k: int, n: int) -> int:
    """numerics.md: sat_n(rshr(x, k)) with Python ints (left shifts exact, then clipped)."""
    y = (x + (1 << (k - 1))) >> k if k > 0 else x << -k
    lim = (1 << n) - 1
    return max(-lim, min(lim, y))


@pytest.mark.parametrize("limit_bits", [20, 31, 47, 62])
def test_shift_round_saturate_matches_definition(limit_bits):
    """The saturating shift against its definition, at the overflow boundary |x| = lim >> ls (+-1) of left
    shifts and at right shifts whose result is beyond the limit (both signs)."""
    rng = np.random.default_rng(limit_bits)
    lim = (1 << limit_bits) - 1
    xs, ks = [], []
    for _ in range(3000):
        k = int(rng.integers(-64, 64))
        if k < 0 and rng.random() < 0.6:          # around the left-shift overflow boundary
            edge = lim >> min(-k, 62)
            x = edge + int(rng.integers(-1, 2))
        else:
            x = int(rng.integers(-(1 << 60), 1 << 60)) >> int(rng.integers(0, 60))
        xs.append(int(np.sign(rng.normal())) * abs(x))
        ks.append(k)
    xs, ks = np.array(xs, np.int64), np.array(ks, np.int64)
    want = [_sat_rshr(int(x), int(k), limit_bits) for x, k in zip(xs, ks)]
    assert fp.shift_round_saturate(xs, ks, limit_bits).tolist() == want
    right = ks > 0                                # the right-shift-only fast path on its own
    assert fp.shift_round_saturate(xs[right], ks[right], limit_bits).tolist() == [w for w, r in zip(want, right) if r]
    # both signs reach the limit in each path
    got = np.array(want)
    assert np.sum(got == lim) > 10 and np.sum(got == -lim) > 10
    if limit_bits < 60:   # right shifts of |x| < 2^60 stay below 2^62 - 1: that clamp binds only for narrower limits
        assert np.sum(got[right] == lim) > 0 and np.sum(got[right] == -lim) > 0


def test_bf16_bits_roundtrip_and_fields():
    pats = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16)
    pats = pats[((pats >> 7) & 0xFF) != 0xFF]  # no Inf/NaN
    vals = fp.bf16_value(pats)
    np.testing.assert_array_equal(fp.bf16_bits(vals)[vals != 0], pats[vals != 0])
    m, x = fp.bf16_fields(pats)
    np.testing.assert_array_equal(np.ldexp(m.astype(np.float64), x), vals)
    assert np.all(np.abs(m) < 256)


def test_bf16_rejects_nan_inf_and_overflow():
    with pytest.raises(ValueError, match="NaN"):
        fp.bf16_round([1.0, np.nan])
    with pytest.raises(ValueError, match="range"):
        fp.bf16_round([1e39])
    with pytest.raises(ValueError, match="Inf/NaN"):
        fp.bf16_fields(np.array([0x7F80], np.uint16))


@pytest.mark.parametrize("bits", WIDTHS)
def test_quantize_matches_definition(bits):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(300, 64)) * rng.uniform(0.01, 100, size=(300, 1)) + rng.normal(size=(300, 1))
    kv = quantize(x, bits)
    lo, hi = x.min(1), x.max(1)
    s = fp.bf16_round(np.clip((hi - lo) / (2**bits - 1), 1e-5, 1e5))
    z = fp.bf16_round(-lo)
    np.testing.assert_array_equal(fp.bf16_value(kv.scale), s)
    np.testing.assert_array_equal(fp.bf16_value(kv.zero), z)
    q = np.clip(np.rint((x + z[:, None]) / s[:, None]), 0, 2**bits - 1)
    np.testing.assert_array_equal(kv.codes, q)
    # Dequantisation error: half a step, plus what the bf16 rounding of s and z costs.
    err = np.abs(dequantize(kv) - x)
    bound = s[:, None] / 2 + np.abs(lo)[:, None] * 2.0**-8 + (hi - lo)[:, None] * 2.0**-8
    assert np.all(err <= bound + 1e-12)


@pytest.mark.parametrize("bits", WIDTHS)
def test_quantize_ties_round_to_even(bits):
    """(x + z) / s exactly half way between two codes rounds to the even code (scale 1, zero 0 here)."""
    top = 2**bits - 1
    halves = sorted({h for h in (0.5, 1.5, 2.5, 3.5, top - 1.5, top - 0.5) if 0 < h < top})
    kv = quantize(np.array([[0.0, float(top), *halves]]), bits)
    assert fp.bf16_value(kv.scale)[0] == 1.0 and fp.bf16_value(kv.zero)[0] == 0.0
    even = [int(h - 0.5) if int(h - 0.5) % 2 == 0 else int(h + 0.5) for h in halves]
    assert kv.codes[0, 2:].tolist() == even


def test_quantize_scale_clamp():
    flat = np.full((2, 8), 3.0)                    # max == min: scale clamps up to 1e-5
    kv = quantize(flat, 4)
    assert fp.bf16_value(kv.scale)[0] == fp.bf16_round(1e-5)
    assert np.all(kv.codes == 0)
    np.testing.assert_allclose(dequantize(kv), 3.0, rtol=2**-8)
    huge = np.array([[-1e9, 1e9]])                  # range / 3 > 1e5: scale clamps down to 1e5
    assert fp.bf16_value(quantize(huge, 2).scale)[0] == fp.bf16_round(1e5)


@pytest.mark.parametrize("bad,msg", [
    (dict(x=np.zeros((4, 8)), bits=3), "unsupported bit width 3"),
    (dict(x=np.zeros((4, 8)), bits=1), "unsupported bit width 1"),
    (dict(x=np.zeros(8), bits=4), "tokens, head_dim"),
    (dict(x=np.zeros((0, 8)), bits=4), "non-empty"),
    (dict(x=np.array([[1.0, np.inf]]), bits=4), "Inf"),
    (dict(x=np.array([[1.0, np.nan]]), bits=4), "NaN"),
])
def test_quantize_bad_inputs(bad, msg):
    with pytest.raises(ValueError, match=msg):
        quantize(**bad)


@pytest.mark.parametrize("n", (8, 4, 2))
def test_shrink_exhaustive_against_formula(n):
    q = np.arange(1 << (2 * n))
    expected = [(((v << 2 * n) - (v << n) + v + 2**(3*n-1) - 2**(2*n-1) + 2**(n-1)) >> 3 * n) & ((1 << n) - 1)
                for v in q.tolist()]
    got = shrink_codes(q, n)
    np.testing.assert_array_equal(got, expected)
    # It is q / (2^n + 1) to within one code, and monotone.
    assert np.all(np.abs(got - q / (2**n + 1)) <= 1)
    assert np.all(np.diff(got.astype(int)) >= 0)


@pytest.mark.parametrize("n", (8, 4, 2))
def test_shrink_scale_is_rounded_product(n):
    pats = np.arange(0x3000, 0x5000, dtype=np.uint16)  # 1e-5 .. 1e5 region
    exact = fp.bf16_value(pats) * (2**n + 1)
    np.testing.assert_array_equal(fp.bf16_value(shrink_scale(pats, n)), fp.bf16_round(exact))


def test_shrink_error_per_step_is_bounded():
    """Each 2n -> n step moves a dequantised value by at most (0.5 + (2^n - 1) * 2^-8) new steps:
    half a step from the integer formula, plus the bf16 rounding of s' (2^-8 relative) times the code."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 64)) * rng.uniform(0.01, 100, size=(2000, 1))
    kv = quantize(x, 16)
    for n in (8, 4, 2):
        smaller = shrink(kv)
        assert smaller.bits == n
        step = fp.bf16_value(smaller.scale)[:, None]
        moved = np.abs(dequantize(smaller) - dequantize(kv))
        assert np.all(moved <= (0.5 + (2**n - 1) / 256) * step)
        kv = smaller


def test_shrink_errors():
    kv = quantize(np.zeros((1, 4)), 2)
    with pytest.raises(ValueError, match="below 2 bits"):
        shrink(kv)
    with pytest.raises(ValueError, match="widen"):
        shrink_to(kv, 8)
    with pytest.raises(ValueError, match="out of range"):
        shrink_codes(np.array([256]), 4)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(WIDTHS), tokens=st.integers(1, 40), head_dim=st.sampled_from([1, 3, 64, 128]),
       word_bits=st.sampled_from([64, 128, 256, 512]), seed=st.integers(0, 2**31))
def test_pack_unpack_roundtrip(bits, tokens, head_dim, word_bits, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(tokens, head_dim)).astype(np.uint16)
    packed = pack_codes(codes, bits, word_bits)
    assert packed.size % (word_bits // 8) == 0
    assert packed.size * 8 - tokens * head_dim * bits < word_bits
    np.testing.assert_array_equal(unpack_codes(packed, bits, tokens, head_dim), codes)


def test_pack_bit_order_is_lsb_first_little_endian():
    # 2-bit codes 1,2,3,0 -> byte 0b00_11_10_01; 16-bit code 0x1234 -> bytes 34 12.
    assert pack_codes(np.array([[1, 2, 3, 0]]), 2, 64)[0] == 0b00111001
    assert list(pack_codes(np.array([[0x1234]]), 16, 64)[:2]) == [0x34, 0x12]
    assert pack_codes(np.array([[0xA, 0x5]]), 4, 64)[0] == 0x5A


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=20),
                  elements=st.floats(-1e4, 1e4, allow_nan=False)), st.sampled_from(WIDTHS))
def test_quantize_properties(x, bits):
    kv = quantize(x, bits)
    assert kv.codes.shape == x.shape and kv.codes.max() < 2**bits
    s = fp.bf16_value(kv.scale)
    assert np.all((s > 0) & (s <= 1.01e5))
    words = pack_metadata(kv.scale, kv.zero)
    s2, z2 = unpack_metadata(words)
    np.testing.assert_array_equal(s2, kv.scale)
    np.testing.assert_array_equal(z2, kv.zero)


def test_pack_errors():
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(np.array([[4]]), 2)
    with pytest.raises(ValueError, match="word width"):
        pack_codes(np.array([[1]]), 2, word_bits=96)
    with pytest.raises(ValueError, match="fewer than"):
        unpack_codes(np.zeros(3, np.uint8), 16, 2, 1)


def test_quantized_kv_shape_checks():
    with pytest.raises(ValueError, match="scale/zero"):
        QuantizedKV(np.zeros((3, 4), np.uint16), np.zeros(2, np.uint16), np.zeros(3, np.uint16), 4)
