"""Decode attention exactly as the datapath computes it (docs/numerics.md sections 4-7),
and the float64 reference it is measured against.

Flow for one KV head and its G query heads:
  quantize_query (host)  ->  attention_partial (device: scores, exp2, value accumulation)
  ->  normalize / merge_partials (host, float64).

The arithmetic is defined once, batched over H KV heads: `attention_partials` (and `batched_scores`) on code
segments in token order, each either packed rows as they sit in device memory or unpacked codes. The
single-head `attention_partial` / `scores` are its H = 1 case; the host's golden kernel calls it directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .fixedpoint import bf16_fields, check_finite, shift_round, shift_round_saturate
from .formats import (ACC_UNIT_OFFSET, EXP2_SEGMENTS_LOG2, EXP2_SHIFT_MAX, MAX_PARTIAL_TOKENS, P_FRAC, QUERY_BITS,
                      QUERY_MAX, SCORE_BITS, SCORE_FRAC, TERM_LIMIT_BITS, W_BITS, W_SHIFT_BIAS, Z_SHIFT_BIAS)
from .quant import QuantizedKV, dequantize, unpack_rows

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Query:
    """G query heads as signed integer codes with one power-of-two exponent per head:
    q_log2 = codes * 2^exp, where q_log2 = q * softmax_scale * log2(e) (scores in the log2 domain)."""
    codes: np.ndarray  # (G, head_dim) int64, |code| <= 32767
    exp: np.ndarray    # (G,) int64

    def value(self) -> np.ndarray:
        return np.ldexp(self.codes.astype(np.float64), self.exp[:, None])


@dataclass(frozen=True)
class Partial:
    """Unnormalised result of one engine over one run of tokens, for G query heads.
    out = acc * 2^(E - 34) / (L * 2^-32) once all partials are merged."""
    m: np.ndarray    # (G,) int64: max score (log2 domain, 16 fraction bits)
    L: np.ndarray    # (G,) int64: sum of p = 2^(score - m), 32 fraction bits
    acc: np.ndarray  # (G, head_dim) int64: sum of W * c16 - Z, in units of 2^(E - 34)
    E: int           # value magnitude exponent of the run


def quantize_query(q, softmax_scale: float) -> Query:
    """Fold the softmax scale and log2(e) into q (G, head_dim) and quantize each head to 16-bit codes
    with exp chosen so that max|code| lies in [2^14, 2^15 - 1] (exp = 0 for an all-zero head)."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.size == 0:
        raise ValueError(f"query must be a non-empty (G, head_dim) array, got shape {q.shape}")
    check_finite("query", q)
    if not np.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    ql = q * (softmax_scale * LOG2E)
    amax = np.abs(ql).max(axis=1)
    _, e = np.frexp(amax)  # amax = f * 2^e with 0.5 <= f < 1
    exp = np.where(amax > 0, e - (QUERY_BITS - 1), 0).astype(np.int64)
    codes = np.clip(np.rint(np.ldexp(ql, -exp[:, None])), -QUERY_MAX, QUERY_MAX).astype(np.int64)
    return Query(codes, exp)


def _exp2_table() -> np.ndarray:
    i = np.arange((1 << EXP2_SEGMENTS_LOG2) + 1, dtype=np.float64)
    return np.rint(np.exp2(P_FRAC - i / (1 << EXP2_SEGMENTS_LOG2))).astype(np.int64)


EXP2_TABLE = _exp2_table()  # 257 entries, EXP2_TABLE[0] = 2^32, EXP2_TABLE[256] = 2^31


def exp2_neg(x) -> np.ndarray:
    """p = 2^(-x / 2^16) with 32 fraction bits, for integer x >= 0 (the exp2 unit)."""
    x = np.asarray(x, dtype=np.int64)
    n = x >> SCORE_FRAC
    f = x & ((1 << SCORE_FRAC) - 1)
    low_bits = SCORE_FRAC - EXP2_SEGMENTS_LOG2
    i, r = f >> low_bits, f & ((1 << low_bits) - 1)
    t0, t1 = EXP2_TABLE[i], EXP2_TABLE[i + 1]
    v = t0 - (((t0 - t1) * r + (1 << (low_bits - 1))) >> low_bits)
    return shift_round(v, np.minimum(n, EXP2_SHIFT_MAX))


def _token_fields(blocks: Sequence[QuantizedKV], what: str, head_dim: int | None = None):
    """Per-token (bits, scale, zero) of a block sequence, after checking the blocks agree."""
    if not blocks:
        raise ValueError(f"no {what} blocks given: attention needs at least one token")
    hd = {b.head_dim for b in blocks}
    if len(hd) != 1:
        raise ValueError(f"{what} blocks have different head_dim: {sorted(hd)}")
    if head_dim is not None and hd != {head_dim}:
        raise ValueError(f"query head_dim {head_dim} != {what} head_dim {hd.pop()}")
    bits = np.concatenate([np.full(b.tokens, b.bits, np.int64) for b in blocks])
    if bits.size == 0:
        raise ValueError(f"{what} blocks hold no tokens: attention needs at least one token")
    return bits, np.concatenate([b.scale for b in blocks]), np.concatenate([b.zero for b in blocks])


CHUNK_TOKENS = 256  # default tokens decoded to float64 at a time, so the matmuls read the codes from cache


def _segment_chunks(data, bits: int, tokens: int, head_dim: int, chunk: int, scratch: np.ndarray, msb: bool):
    """(first token, float64 codes (H, m, head_dim)) over one segment, `chunk` tokens at a time, in `scratch`.
    data: packed rows (H, >= bytes) uint8 (numerics.md 2) or codes (H, tokens, head_dim)."""
    packed = data.ndim == 2
    per_token = head_dim * bits // 8  # packed rows: whole bytes per token (head_dim * bits % 8 == 0)
    for t0 in range(0, tokens, chunk):
        m = min(chunk, tokens - t0)
        out = scratch[:, :m]
        if packed:
            unpack_rows(data[:, t0 * per_token:(t0 + m) * per_token], bits, m, head_dim, out=out, msb=msb)
        elif msb:
            np.multiply(data[:, t0:t0 + m], float(1 << (16 - bits)), out=out)
        else:
            out[...] = data[:, t0:t0 + m]
        yield t0, out


def iter_chunks(segments, head_dim: int, msb: bool = False, chunk: int | None = None):
    """Decode code segments [(data, bits, tokens)] in token order, a chunk at a time: yields
    (first token, float64 codes (H, m, head_dim)), MSB-aligned to 16 bits if msb; the array is reused
    between chunks. data: packed rows (H, >= bytes) uint8, or codes (H, tokens, head_dim)."""
    chunk = min(chunk or CHUNK_TOKENS, max((n for _, _, n in segments), default=1))
    lo, scratch = 0, None
    for data, bits, n in segments:
        if scratch is None:
            scratch = np.empty((data.shape[0], chunk, head_dim))
        for t0, c in _segment_chunks(data, bits, n, head_dim, chunk, scratch, msb):
            yield lo + t0, c
        lo += n


def batched_scores(qcodes, qexp, ksegs, kscale, kzero, chunk: int | None = None) -> np.ndarray:
    """Scores (H, G, T) of numerics.md section 5 for H KV heads: qcodes (H, G, hd) int, qexp (H, G) int,
    ksegs code segments [(data, bits, tokens)] in token order, kscale/kzero (H, T) bf16 patterns.
    D = Q . c is exact in float64 BLAS (|D| < 2^38)."""
    qcodes = np.asarray(qcodes)
    H, G, hd = qcodes.shape
    qf = qcodes.astype(np.float64)
    df = np.empty((H, G, kscale.shape[1]))
    for lo, c in iter_chunks(ksegs, hd, chunk=chunk):
        np.matmul(qf, c.transpose(0, 2, 1), out=df[:, :, lo:lo + c.shape[1]])
    d = df.astype(np.int64)
    sq = qcodes.astype(np.int64).sum(axis=2)[:, :, None]
    ms, xs = bf16_fields(kscale)
    mz, xz = bf16_fields(kzero)
    eq = np.asarray(qexp).astype(np.int64)[:, :, None]
    t1 = shift_round_saturate(ms[:, None, :] * d, -(xs[:, None, :] + eq + SCORE_FRAC), TERM_LIMIT_BITS)
    t2 = shift_round_saturate(mz[:, None, :] * sq, -(xz[:, None, :] + eq + SCORE_FRAC), TERM_LIMIT_BITS)
    lim = (1 << (SCORE_BITS - 1)) - 1
    return np.clip(t1 - t2, -lim, lim)


def _weighted_code_sum(w: np.ndarray, vsegs, head_dim: int, chunk: int | None) -> np.ndarray:
    """sum_t W_t * c16_td (H, G, head_dim) int64, exact: per segment, sum_t W_t * c_td in float64 chunks of at
    most 2^(26 - bits) tokens (each sum below 2^(26 + bits) * 2^(26 - bits) = 2^52), then << (16 - bits)."""
    wf = w.astype(np.float64)
    H, G, _ = w.shape
    acc = np.zeros((H, G, head_dim), np.int64)
    cap = chunk or CHUNK_TOKENS
    scratch = np.empty((H, min(cap, max(n for _, _, n in vsegs)), head_dim))
    lo = 0
    for data, bits, n in vsegs:
        step = max(1, min(cap, 1 << (W_BITS - bits)))
        for t0, c in _segment_chunks(data, bits, n, head_dim, step, scratch, msb=False):
            acc += np.matmul(wf[:, :, lo + t0:lo + t0 + c.shape[1]], c).astype(np.int64) << (16 - bits)
        lo += n
    return acc


def attention_partials(qcodes, qexp, ksegs, kbits, kscale, kzero, vsegs, vbits, vscale, vzero,
                       chunk: int | None = None):
    """THE datapath arithmetic (numerics.md sections 5-7): partials for H KV heads at once.

    qcodes (H, G, hd) int, qexp (H, G); ksegs/vsegs: code segments in token order [(data, bits, tokens)],
    data packed rows (H, >= bytes) uint8 or codes (H, tokens, hd); kbits/vbits (T,) width of each token;
    scale/zero (H, T) bf16 patterns; chunk: tokens decoded at a time (default CHUNK_TOKENS).
    Returns m (H, G), L (H, G), acc (H, G, hd) int64, E (H,) int64. Raises ValueError for a value scale <= 0."""
    qcodes = np.asarray(qcodes)
    hd = qcodes.shape[2]
    s = batched_scores(qcodes, qexp, ksegs, kscale, kzero, chunk)
    m = s.max(axis=2)
    p = exp2_neg(m[:, :, None] - s)
    ms, xs = bf16_fields(vscale)
    mz, xz = bf16_fields(vzero)
    if np.any(ms <= 0):
        raise ValueError("value scales must be positive")
    vb = np.asarray(vbits, np.int64)[None, :]
    E = np.max(np.maximum(xs + vb, xz), axis=1)                         # (H,) magnitude exponent of the run
    Eb = E[:, None, None]
    # W: p * s in the accumulator unit per MSB-aligned code c16; Z: p * z in the same unit.
    w = shift_round(p * ms[:, None, :], Eb + W_SHIFT_BIAS - (xs + vb)[:, None, :])
    z = shift_round(p * mz[:, None, :], Eb + Z_SHIFT_BIAS - xz[:, None, :])
    acc = _weighted_code_sum(w, vsegs, hd, chunk) - z.sum(axis=2)[:, :, None]
    return m, p.sum(axis=2), acc, E


def _segments(blocks: Sequence[QuantizedKV]):
    """One KV head's blocks as code segments for the batched form (H = 1, unpacked codes)."""
    return [(b.codes[None], b.bits, b.tokens) for b in blocks]


SINGLE_HEAD_CHUNK = 4096  # one head's chunks can be larger than the host's (H heads at once) and stay in cache


def scores(query: Query, keys: Sequence[QuantizedKV]) -> np.ndarray:
    """Integer scores (G, T), log2 domain with 16 fraction bits, saturating at +-(2^31 - 1)."""
    _, scale, zero = _token_fields(keys, "key", query.codes.shape[1])
    return batched_scores(query.codes[None], query.exp[None], _segments(keys), scale[None], zero[None],
                          SINGLE_HEAD_CHUNK)[0]


def attention_partial(query: Query, keys: Sequence[QuantizedKV], values: Sequence[QuantizedKV]) -> Partial:
    """What one engine returns for one run of at most 2^16 tokens (two passes: keys, then values):
    the H = 1 case of attention_partials."""
    kbits, kscale, kzero = _token_fields(keys, "key", query.codes.shape[1])
    bits, scale, zero = _token_fields(values, "value", query.codes.shape[1])
    if bits.size != kbits.size:
        raise ValueError(f"{kbits.size} key tokens but {bits.size} value tokens")
    if bits.size > MAX_PARTIAL_TOKENS:
        raise ValueError(f"a partial covers at most {MAX_PARTIAL_TOKENS} tokens, got {bits.size}")
    m, L, acc, E = attention_partials(query.codes[None], query.exp[None], _segments(keys), kbits, kscale[None],
                                      kzero[None], _segments(values), bits, scale[None], zero[None],
                                      SINGLE_HEAD_CHUNK)
    return Partial(m=m[0], L=L[0], acc=acc[0], E=int(E[0]))


def normalize(part: Partial) -> np.ndarray:
    """Final output of a single partial, float64 (G, head_dim)."""
    return merge_partials([part])


def merge_partials(parts: Sequence[Partial]) -> np.ndarray:
    """Merge partials of one context split across engines (host side, float64, in list order):
    a_i = 2^((m_i - m*) / 2^16), out = sum_i a_i * acc_i * 2^(E_i - 34) / sum_i a_i * L_i * 2^-32."""
    if not parts:
        raise ValueError("no partial results to merge")
    m_star = np.max([p.m for p in parts], axis=0)
    num = 0.0
    den = 0.0
    for p in parts:
        a = np.exp2((p.m - m_star) / float(1 << SCORE_FRAC))
        num = num + a[:, None] * np.ldexp(p.acc.astype(np.float64), p.E - ACC_UNIT_OFFSET)
        den = den + a * np.ldexp(p.L.astype(np.float64), -P_FRAC)
    return num / den[:, None]


def attention(query: Query, keys: Sequence[QuantizedKV], values: Sequence[QuantizedKV],
              tokens_per_partial: int = MAX_PARTIAL_TOKENS) -> np.ndarray:
    """Whole decode attention: split the context into runs of tokens_per_partial, merge the partials."""
    if not 1 <= tokens_per_partial <= MAX_PARTIAL_TOKENS:
        raise ValueError(f"tokens_per_partial must be in 1..{MAX_PARTIAL_TOKENS}")
    if not keys or not values:
        raise ValueError("no key blocks or no value blocks given: attention needs at least one token")
    ks, vs = split_tokens(keys, tokens_per_partial), split_tokens(values, tokens_per_partial)
    if len(ks) != len(vs):
        raise ValueError("keys and values hold different numbers of tokens")
    return merge_partials([attention_partial(query, k, v) for k, v in zip(ks, vs)])


def split_tokens(blocks: Sequence[QuantizedKV], n: int) -> list[list[QuantizedKV]]:
    """Cut a block sequence into runs of n tokens (the last may be shorter)."""
    runs, cur, used = [], [], 0
    for b in blocks:
        start = 0
        while start < b.tokens:
            take = min(n - used, b.tokens - start)
            cur.append(QuantizedKV(b.codes[start:start + take], b.scale[start:start + take],
                                   b.zero[start:start + take], b.bits))
            start, used = start + take, used + take
            if used == n:
                runs.append(cur)
                cur, used = [], 0
    if cur:
        runs.append(cur)
    return runs


def reference_attention(q_log2, k, v) -> np.ndarray:
    """float64 attention in the log2 domain: softmax over q_log2 . k, weights 2^(s - max)."""
    q_log2, k, v = (np.asarray(a, dtype=np.float64) for a in (q_log2, k, v))
    s = q_log2 @ k.T
    p = np.exp2(s - s.max(axis=1, keepdims=True))
    return (p @ v) / p.sum(axis=1, keepdims=True)


def reference_for(query: Query, keys: Sequence[QuantizedKV], values: Sequence[QuantizedKV]) -> np.ndarray:
    """The float64 reference on the same integer query and the dequantised KV."""
    k = np.concatenate([dequantize(b) for b in keys])
    v = np.concatenate([dequantize(b) for b in values])
    return reference_attention(query.value(), k, v)
