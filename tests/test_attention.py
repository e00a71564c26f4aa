"""Decode attention golden model: agreement with numerics.md (an independent scalar implementation in
plain Python integers), the error bound against float64, adversarial data, GQA, merging, bad inputs."""
import math

import numpy as np
import pytest

from pmkvq_accel.model import attention as A
from pmkvq_accel.model import formats as F
from pmkvq_accel.model.quant import QuantizedKV, dequantize, quantize
from numerics_spec import TERM_LIMIT, spec_partial

BOUND = 1e-3  # max |out - ref| <= BOUND * max|V^|  (docs/numerics.md section 10)


# The independent scalar implementation of numerics.md (Python ints) lives in tests/numerics_spec.py.


def make_blocks(x, widths):
    """Quantize x (T, hd) as consecutive blocks [(n_tokens, bits), ...] (sink / body / window)."""
    blocks, pos = [], 0
    for n, bits in widths:
        if n:
            blocks.append(quantize(x[pos:pos + n], bits))
        pos += n
    assert pos == x.shape[0]
    return blocks


def layout(T, body_bits, sink=1, window=128):
    s = min(sink, T)
    w = min(window, T - s)
    return [(s, 16), (T - s - w, body_bits), (w, 16)]


@pytest.mark.parametrize("T,G,hd,bits", [(1, 1, 64, 4), (5, 3, 64, 2), (9, 8, 128, 8), (7, 2, 64, 16), (140, 3, 64, 2)])
def test_golden_matches_scalar_spec(T, G, hd, bits):
    rng = np.random.default_rng(T * 7 + G)
    k = rng.normal(size=(T, hd)) * 3
    v = rng.normal(size=(T, hd)) + 2
    keys = make_blocks(k, layout(T, bits, window=3))
    values = make_blocks(v, layout(T, bits, window=3))
    query = A.quantize_query(rng.normal(size=(G, hd)), 1 / math.sqrt(hd))
    part = A.attention_partial(query, keys, values)
    for g, (M, L, acc, E) in enumerate(spec_partial(query, keys, values)):
        assert part.m[g] == M and part.L[g] == L and part.E == E
        assert part.acc[g].tolist() == acc


def test_exp2_unit_accuracy():
    x = np.arange(0, 40 << 16, 97, dtype=np.int64)
    p = A.exp2_neg(x)
    exact = np.exp2(32 - x / 65536.0)
    assert p[0] == 2**32
    assert np.all(np.abs(p - exact) <= exact * 3e-6 + 0.5 + 1e-9)
    assert np.all(np.diff(p) <= 0)


def check_bound(query, keys, values):
    out = A.attention(query, keys, values)
    ref = A.reference_for(query, keys, values)
    vmax = np.abs(np.concatenate([dequantize(b) for b in values])).max()
    err = np.abs(out - ref).max()
    assert err <= BOUND * vmax, f"error {err / vmax:.3g} * max|V| exceeds the bound"
    return err / vmax


@pytest.mark.parametrize("T", [1, 2, 128, 129, 1000, 4096])
@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_error_bound_random(T, bits):
    rng = np.random.default_rng(T + bits)
    hd, G = 64, 3
    k = rng.normal(size=(T, hd)) * np.where(np.arange(hd) % 17 == 3, 12.0, 1.0)  # outlier channels
    v = rng.normal(size=(T, hd))
    q = A.quantize_query(rng.normal(size=(G, hd)) * 2, 1 / 8)
    check_bound(q, make_blocks(k, layout(T, bits)), make_blocks(v, layout(T, bits)))


def test_error_bound_32k_tokens_head_dim_128():
    rng = np.random.default_rng(32768)
    T, hd, G = 32768, 128, 3
    k = rng.normal(size=(T, hd)).astype(np.float32)
    v = rng.normal(size=(T, hd)).astype(np.float32)
    q = A.quantize_query(rng.normal(size=(G, hd)) * 3, 1 / math.sqrt(hd))
    check_bound(q, make_blocks(k, layout(T, 2)), make_blocks(v, layout(T, 2)))


@pytest.mark.parametrize("case", ["equal_keys", "single_token_dominant", "huge_scales", "tiny_scales",
                                  "value_offset", "mixed_magnitudes", "extreme_scores"])
def test_error_bound_adversarial(case):
    rng = np.random.default_rng(sum(map(ord, case)))
    T, hd, G = 32768 if case in ("single_token_dominant", "equal_keys") else 2048, 64, 4
    k = rng.normal(size=(T, hd))
    v = rng.normal(size=(T, hd))
    qf = rng.normal(size=(G, hd))
    if case == "equal_keys":
        k[:] = k[0]
    elif case == "single_token_dominant":
        # one token far above 32767 weak, identical ones: all the small weights round the same way
        k[:] = k[0] * 0.0 + 0.1
        k[777] = qf[0] * 40
        v[:] = v[0]
    elif case == "huge_scales":
        k *= 1e4
        v *= 3e4
        qf *= 1e-4
    elif case == "tiny_scales":  # values at the quantizer's scale clamp (s >= 1e-5); see numerics.md 10
        k *= 1e-5
        v *= 1e-5
        qf *= 1e5
    elif case == "value_offset":
        v = v * 1e-3 + 1000.0
    elif case == "mixed_magnitudes":
        v *= np.exp2(rng.integers(-20, 20, size=(T, 1)))
    elif case == "extreme_scores":  # logits in the thousands, far beyond any real model
        k *= 30
        qf *= 30
    q = A.quantize_query(qf, 1 / 8)
    check_bound(q, make_blocks(k, layout(T, 4)), make_blocks(v, layout(T, 2)))


def test_gqa_heads_are_independent():
    rng = np.random.default_rng(8)
    k, v = rng.normal(size=(300, 64)), rng.normal(size=(300, 64))
    keys, values = make_blocks(k, layout(300, 4)), make_blocks(v, layout(300, 4))
    qf = rng.normal(size=(8, 64))
    together = A.attention(A.quantize_query(qf, 0.125), keys, values)
    for g in (0, 5, 7):
        alone = A.attention(A.quantize_query(qf[g:g + 1], 0.125), keys, values)
        np.testing.assert_array_equal(together[g], alone[0])


@pytest.mark.parametrize("run", [1, 100, 128, 1000])
def test_split_runs_merge_close_to_one_run(run):
    rng = np.random.default_rng(run)
    T = 3000
    k, v = rng.normal(size=(T, 64)) * 2, rng.normal(size=(T, 64))
    keys, values = make_blocks(k, layout(T, 2)), make_blocks(v, layout(T, 8))
    q = A.quantize_query(rng.normal(size=(3, 64)), 0.125)
    one = A.attention(q, keys, values)
    split = A.attention(q, keys, values, tokens_per_partial=run)
    vmax = np.abs(v).max()
    assert np.abs(one - split).max() <= 1e-4 * vmax


def test_query_quantization_format():
    q = A.quantize_query(np.array([[0.5, -3.0, 1e-3], [0.0, 0.0, 0.0]]), 1.0)
    assert np.abs(q.codes[0]).max() in range(2**14, 2**15)
    assert q.exp[1] == 0 and not q.codes[1].any()
    np.testing.assert_allclose(q.value()[0], np.array([0.5, -3.0, 1e-3]) * A.LOG2E, atol=2.0**q.exp[0])
    # max|q| just below a power of two rounds up to 2^15: clamped to +-32767 on both signs
    edge = (1 - 2.0**-17) * 8
    q = A.quantize_query(np.array([[edge, 1.0], [-edge, 1.0]]), 1.0 / A.LOG2E)
    assert q.codes[:, 0].tolist() == [32767, -32767] and q.exp.tolist() == [-12, -12]


@pytest.mark.parametrize("make,msg", [
    (lambda q, k, v: A.attention(q, [], v), "no key blocks"),
    (lambda q, k, v: A.attention(q, k, k[:1]), "different numbers of tokens|key tokens but"),
    (lambda q, k, v: A.attention(A.quantize_query(np.ones((2, 32)), 1.0), k, v), "head_dim"),
    (lambda q, k, v: A.quantize_query(np.full((1, 64), np.nan), 1.0), "NaN"),
    (lambda q, k, v: A.quantize_query(np.ones(64), 1.0), "G, head_dim"),
    (lambda q, k, v: A.quantize_query(np.ones((1, 64)), float("inf")), "softmax_scale"),
    (lambda q, k, v: A.attention(q, k, v, tokens_per_partial=0), "tokens_per_partial"),
])
def test_bad_inputs(make, msg):
    rng = np.random.default_rng(0)
    k = make_blocks(rng.normal(size=(10, 64)), layout(10, 4, window=2))
    v = make_blocks(rng.normal(size=(10, 64)), layout(10, 4, window=2))
    q = A.quantize_query(rng.normal(size=(2, 64)), 0.125)
    with pytest.raises(ValueError, match=msg):
        make(q, k, v)


def test_partial_rejects_too_many_tokens():
    big = QuantizedKV(np.zeros((A.MAX_PARTIAL_TOKENS + 1, 1), np.uint16),
                      np.full(A.MAX_PARTIAL_TOKENS + 1, 0x3F80, np.uint16),
                      np.zeros(A.MAX_PARTIAL_TOKENS + 1, np.uint16), 2)
    q = A.quantize_query(np.ones((1, 1)), 1.0)
    with pytest.raises(ValueError, match="at most"):
        A.attention_partial(q, [big], [big])
    assert np.isfinite(A.attention(q, [big], [big])).all()  # attention() splits it into runs


def test_scores_saturate_beyond_range():
    k = quantize(np.array([[1e6, -1e6], [0.0, 1.0]]), 16)
    q = A.quantize_query(np.array([[1e6, 0.0]]), 1.0)
    s = A.scores(q, [k])
    assert s[0, 0] == 2**31 - 1  # far beyond +-32768 log2 units: saturated, not wrapped


def term_limit_keys(rng, tokens=400, hd=65, k_range=(5, 22)):
    """Keys whose score terms T1, T2 are ~2^(k + 43) (both sides of 2^62) and cancel to |T1 - T2| < 2^31.

    Q = [1, 32767, ...]; token t: scale 2^(xs+7) (m = 128), zero 2^(xs+22) (m = 128, xz = xs + 15), codes
    [2^15 + delta, 2^15, ...], eq = 0 and xs = k - 16, so T2 = 2^(k+22) * sum(Q) and T1 = T2 + 2^(k+7) * delta."""
    q = A.Query(np.array([[1] + [32767] * (hd - 1)], np.int64), np.array([0], np.int64))
    k = np.concatenate([rng.integers(*k_range, size=tokens // 2), rng.integers(18, 22, size=tokens - tokens // 2)])
    xs = k - 16
    delta = rng.integers(-1, 2, size=tokens) * rng.integers(0, 1 << np.minimum(23 - k, 14).clip(1))
    codes = np.full((tokens, hd), 1 << 15, np.int64)
    codes[:, 0] += delta
    scale = ((xs + F.BF16_EXP_BIAS) << 7).astype(np.uint16)        # m = 128, x = xs
    zero = ((xs + 15 + F.BF16_EXP_BIAS) << 7).astype(np.uint16)    # m = 128, x = xs + 15
    return q, QuantizedKV(codes.astype(np.uint16), scale, zero, 16)


def test_score_terms_saturate_at_the_spec_limit():
    """T1/T2 saturate at +-(2^62 - 1) (numerics.md 5): data with both terms below, straddling and above 2^62
    while their exact difference stays within the score range, so 2^61 or 2^63 as the limit would differ."""
    from collections import Counter
    assert F.TERM_LIMIT_BITS == TERM_LIMIT == 62
    q, kv = term_limit_keys(np.random.default_rng(62))
    cov = Counter()
    want = spec_partial(q, [kv], [kv], cov)
    from numerics_spec import spec_scores
    np.testing.assert_array_equal(A.scores(q, [kv]), np.array(spec_scores(q, [kv])))
    part = A.attention_partial(q, [kv], [kv])
    assert part.m[0] == want[0][0] and part.L[0] == want[0][1] and part.acc[0].tolist() == want[0][2]
    # how the terms fell, recomputed exactly
    d = kv.codes.astype(object) @ q.codes[0].astype(object)
    ms, xs = (a.astype(object) for a in A.bf16_fields(kv.scale))
    mz, xz = (a.astype(object) for a in A.bf16_fields(kv.zero))
    t1 = [int(m * dd) << int(x + 16) for m, dd, x in zip(ms, d, xs)]
    t2 = [int(m * int(q.codes[0].sum())) << int(x + 16) for m, x in zip(mz, xz)]
    lim = 2**62
    both = sum(a >= lim and b >= lim and a != b for a, b in zip(t1, t2))
    one = sum((a >= lim) != (b >= lim) for a, b in zip(t1, t2))
    near = sum(a < lim and b < lim and max(a, b) >= 2**61 and a != b for a, b in zip(t1, t2))
    wide = sum(a < lim and b < lim and 2**47 <= max(a, b) for a, b in zip(t1, t2))
    assert both >= 20 and near >= 20 and wide >= 100, (both, one, near, wide)
    assert cov["T1_sat"] >= 20 and cov["T2_sat"] >= 20
    assert all(abs(a - b) < 2**31 for a, b in zip(t1, t2))


def test_formats_are_the_documented_numbers():
    """model/formats.py is what the RTL, golden model and benches share; pin it to numerics.md's numbers."""
    from numerics_spec import P_SHIFT_CAP, SCORE_LIMIT
    assert (F.BF16_EXP_BIAS, F.BF16_SUBNORMAL_EXP) == (134, -133)                 # section 1
    assert (F.W_SHIFT_BIAS, F.Z_SHIFT_BIAS, F.ACC_UNIT_OFFSET) == (14, -2, 34)     # section 7: E + 14, E - 2
    assert F.W_BITS == 26 and F.P_FRAC == 32 and F.SCORE_FRAC == 16
    assert F.SCORE_BITS - 1 == SCORE_LIMIT and F.EXP2_SHIFT_MAX == P_SHIFT_CAP == 62
    assert F.WIDTH_CODES == {2: 0, 4: 1, 8: 2, 16: 3}
    assert all(F.code_bits(F.width_code(b)) == b for b in F.SUPPORTED_BITS)
    with pytest.raises(ValueError):
        F.width_code(3)


def test_value_sums_stay_exact_where_a_chunk_nears_2_53():
    """4100 16-bit value tokens at the largest W (~2^26, p ~ 2^32, ms = 255) and codes near 2^16: the exact
    sum of W * c over 4096 tokens is ~2^54, so a float64 chunk longer than 2^(26 - bits) tokens would round."""
    rng = np.random.default_rng(53)
    T, hd = 4100, 4
    keys = [quantize(rng.normal(size=(T, hd)) * 0.01, 16)]             # scores within ~1 log2 unit: p > 2^31
    codes = rng.integers(60000, 1 << 16, size=(T, hd)).astype(np.uint16)
    values = [QuantizedKV(codes, np.full(T, 0x3FFF, np.uint16), np.zeros(T, np.uint16), 16)]  # s = 255 * 2^-7
    q = A.quantize_query(rng.normal(size=(1, hd)), 1.0)
    part = A.attention_partial(q, keys, values)
    M, L, acc, E = spec_partial(q, keys, values)[0]
    assert part.acc[0].tolist() == acc and (part.m[0], part.L[0], part.E) == (M, L, E)
    assert max(acc) > 2**53 and L > T * 2**31
