"""Random decode-attention jobs for the testbenches and the benchmark (golden model inputs)."""
from __future__ import annotations

import numpy as np

from pmkvq_accel.model.attention import quantize_query
from pmkvq_accel.model.quant import quantize

KINDS = ("normal", "outlier", "extreme", "equal", "dominant", "zeroq", "saturate")


def _kv(rng, t, hd, kind):
    x = rng.standard_normal((t, hd))
    if kind == "outlier":
        ch = rng.choice(hd, size=max(1, hd // 16), replace=False)
        x[:, ch] *= 40.0
    elif kind == "extreme":
        x *= 10.0 ** rng.uniform(-4.5, 4.5, size=(t, 1))
    elif kind == "equal":
        x[:] = x[0]
    elif kind == "dominant":
        x *= 0.05
    return x


def segment_plan(t: int, sink: int, window: int, body_bits, edge_bits=16):
    """[(count, bits), ...] for sink / body / window over t tokens (empty parts dropped)."""
    s = min(sink, t)
    w = min(window, t - s)
    b = t - s - w
    plan = [(s, edge_bits), (b, body_bits), (w, edge_bits)]
    return [(n, bits) for n, bits in plan if n > 0]


def random_job(rng: np.random.Generator, groups: int, head_dim: int, tokens: int, kbits: int, vbits: int,
               kind: str = "normal", sink: int = 16, window: int = 16, edge_bits: int = 16,
               split_body: int | None = None):
    """(query, keys, values). `split_body` gives the body's value blocks a second, different cut."""
    q = rng.standard_normal((groups, head_dim))
    if kind == "outlier":
        q[:, 0] *= 20
    if kind == "zeroq":
        q[0] = 0.0
    if kind == "saturate":      # huge scores that saturate, keys with a large common offset (cancelling terms)
        q *= 1e5
    query = quantize_query(q, 1.0 / np.sqrt(head_dim) * (8.0 if kind == "dominant" else 1.0))
    k = _kv(rng, tokens, head_dim, kind)
    v = _kv(rng, tokens, head_dim, kind)
    if kind == "dominant":
        k[tokens // 2] = q[0] * 10
    if kind == "saturate":
        k += 3e3
    keys, values, t0 = [], [], 0
    for n, bits in segment_plan(tokens, sink, window, kbits, edge_bits):
        keys.append(quantize(k[t0:t0 + n], bits))
        t0 += n
    t0 = 0
    for n, bits in segment_plan(tokens, sink, window, vbits, edge_bits):
        if split_body and bits == vbits and n > split_body and vbits != edge_bits:
            values.append(quantize(v[t0:t0 + split_body], bits))
            values.append(quantize(v[t0 + split_body:t0 + n], 2 * bits if bits < 16 else bits))
        else:
            values.append(quantize(v[t0:t0 + n], bits))
        t0 += n
    return query, keys, values
