"""Decode attention exactly as the datapath computes it (docs/numerics.md sections 4-7),
and the float64 reference it is measured against.

Flow for one KV head and its G query heads:
  quantize_query (host)  ->  attention_partial (device: scores, exp2, value accumulation)
  ->  normalize / merge_partials (host, float64).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .fixedpoint import bf16_fields, check_finite, shift_round, shift_round_saturate
from .formats import (ACC_UNIT_OFFSET, EXP2_SEGMENTS_LOG2, MAX_PARTIAL_TOKENS, P_FRAC, QUERY_BITS,
                      QUERY_MAX, SCORE_BITS, SCORE_FRAC, TERM_LIMIT_BITS)
from .quant import QuantizedKV, dequantize

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
    return shift_round(v, np.minimum(n, 62))


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


def _chunks(block: QuantizedKV, max_tokens: int):
    """(start, codes as float64) over a block in cache-sized pieces of at most max_tokens."""
    step = max(1, min(max_tokens, 4096))
    for lo in range(0, block.tokens, step):
        yield lo, block.codes[lo:lo + step].astype(np.float64)


def _dot_products(query: Query, keys: Sequence[QuantizedKV]) -> np.ndarray:
    """D (G, T) = sum_d Q_d * c_td at each block's own width; exact (|D| < 2^38) in float64 BLAS."""
    qf = query.codes.astype(np.float64)
    out = np.empty((qf.shape[0], sum(b.tokens for b in keys)))
    pos = 0
    for b in keys:
        for lo, c in _chunks(b, b.tokens):
            out[:, pos + lo:pos + lo + c.shape[0]] = qf @ c.T
        pos += b.tokens
    return out.astype(np.int64)


def _weighted_code_sum(w: np.ndarray, values: Sequence[QuantizedKV]) -> np.ndarray:
    """sum_t W_t * c16_td (G, head_dim), exact: each float64 BLAS chunk stays below 2^53."""
    acc = np.zeros((w.shape[0], values[0].head_dim), np.int64)
    pos = 0
    for b in values:
        wb = w[:, pos:pos + b.tokens].astype(np.float64)
        # W < 2^26 and c < 2^b: a chunk of n tokens sums below n * 2^(26 + b) <= 2^52.
        for lo, c in _chunks(b, 1 << (26 - b.bits)):
            acc += (wb[:, lo:lo + c.shape[0]] @ c).astype(np.int64) << (16 - b.bits)
        pos += b.tokens
    return acc


def scores(query: Query, keys: Sequence[QuantizedKV]) -> np.ndarray:
    """Integer scores (G, T), log2 domain with 16 fraction bits, saturating at +-(2^31 - 1)."""
    _, scale, zero = _token_fields(keys, "key", query.codes.shape[1])
    d = _dot_products(query, keys)
    sq = query.codes.sum(axis=1)
    ms, xs = bf16_fields(scale)
    mz, xz = bf16_fields(zero)
    eq = query.exp[:, None]
    t1 = shift_round_saturate(ms * d, -(xs + eq + SCORE_FRAC), TERM_LIMIT_BITS)
    t2 = shift_round_saturate(mz * sq[:, None], -(xz + eq + SCORE_FRAC), TERM_LIMIT_BITS)
    lim = (1 << (SCORE_BITS - 1)) - 1
    return np.clip(t1 - t2, -lim, lim)


def attention_partial(query: Query, keys: Sequence[QuantizedKV], values: Sequence[QuantizedKV]) -> Partial:
    """What one engine returns for one run of at most 2^16 tokens (two passes: keys, then values)."""
    s = scores(query, keys)
    bits, scale, zero = _token_fields(values, "value", query.codes.shape[1])
    if bits.size != s.shape[1]:
        raise ValueError(f"{s.shape[1]} key tokens but {bits.size} value tokens")
    if bits.size > MAX_PARTIAL_TOKENS:
        raise ValueError(f"a partial covers at most {MAX_PARTIAL_TOKENS} tokens, got {bits.size}")
    m = s.max(axis=1)
    p = exp2_neg(m[:, None] - s)
    ms, xs = bf16_fields(scale)
    mz, xz = bf16_fields(zero)
    if np.any(ms <= 0):
        raise ValueError("value scales must be positive")
    E = int(np.max(np.maximum(xs + bits, xz)))
    # W: p * s in the accumulator unit per MSB-aligned code c16; Z: p * z in the same unit.
    w = shift_round(p * ms, E - ACC_UNIT_OFFSET + 48 - xs - bits)
    z = shift_round(p * mz, E - ACC_UNIT_OFFSET + P_FRAC - xz)
    acc = _weighted_code_sum(w, values) - z.sum(axis=1)[:, None]
    return Partial(m=m, L=p.sum(axis=1), acc=acc, E=E)


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
