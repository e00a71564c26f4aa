"""Decode attention golden model: agreement with numerics.md (an independent scalar implementation in
plain Python integers), the error bound against float64, adversarial data, GQA, merging, bad inputs."""
import math

import numpy as np
import pytest

from pmkvq_accel.model import attention as A
from pmkvq_accel.model.fixedpoint import bf16_fields
from pmkvq_accel.model.quant import QuantizedKV, dequantize, quantize

BOUND = 1e-3  # max |out - ref| <= BOUND * max|V^|  (docs/numerics.md section 10)


# ---- independent scalar implementation, written from docs/numerics.md with Python ints ----
def rshr(x: int, k: int) -> int:
    return (x + (1 << (k - 1))) >> k if k > 0 else x << -k


def sat(x: int, n: int) -> int:
    lim = (1 << n) - 1
    return max(-lim, min(lim, x))


def spec_partial(query: A.Query, keys, values):
    kc = [(int(c), b.bits) for b in keys for c in range(b.tokens)]  # unused: clarity only
    del kc
    krows = [(b.codes[t].tolist(), b.bits, int(b.scale[t]), int(b.zero[t])) for b in keys for t in range(b.tokens)]
    vrows = [(b.codes[t].tolist(), b.bits, int(b.scale[t]), int(b.zero[t])) for b in values for t in range(b.tokens)]
    field = lambda bits: tuple(int(v[0]) for v in bf16_fields(np.array([bits], np.uint16)))
    out = []
    for g in range(query.codes.shape[0]):
        Q = [int(v) for v in query.codes[g]]
        eq, sq = int(query.exp[g]), sum(Q)
        sc = []
        for codes, _, s, z in krows:
            (ms, xs), (mz, xz) = field(s), field(z)
            d = sum(a * b for a, b in zip(Q, codes))
            t1 = sat(rshr(ms * d, -(xs + eq + 16)), 47) if -(xs + eq + 16) > 0 else sat(ms * d * 2 ** (xs + eq + 16), 47)
            t2 = sat(rshr(mz * sq, -(xz + eq + 16)), 47) if -(xz + eq + 16) > 0 else sat(mz * sq * 2 ** (xz + eq + 16), 47)
            sc.append(sat(t1 - t2, 31))
        M = max(sc)
        table = [round(2 ** (32 - j / 256)) for j in range(257)]
        ps = []
        for s_ in sc:
            x = M - s_
            n, f = x >> 16, x & 0xFFFF
            i, r = f >> 8, f & 0xFF
            v = table[i] - (((table[i] - table[i + 1]) * r + 128) >> 8)
            ps.append(rshr(v, min(n, 62)))
        E = max(max(field(s)[1] + b, field(z)[1]) for _, b, s, z in vrows)
        acc = [0] * len(vrows[0][0])
        for p, (codes, b, s, z) in zip(ps, vrows):
            (ms, xs), (mz, xz) = field(s), field(z)
            W = rshr(p * ms, E + 14 - xs - b)
            Z = rshr(p * mz, E - 2 - xz)
            assert 0 <= W < 2**26 and abs(Z) < 2**42
            for d, c in enumerate(codes):
                acc[d] += W * (c << (16 - b)) - Z
        out.append((M, sum(ps), acc, E))
    return out


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
