"""Benchmark: golden (bit-exact integer) decode attention vs plain float NumPy attention on the same data.

Run: python model/bench_golden.py   (or make bench-golden). Prints one row per context length, with the
golden output's max error against the float64 reference (same integer query, dequantised KV).
The golden call includes everything the datapath does (scores, exp2 unit, value accumulation, merge);
the float call is softmax(q K^T) V in float32 on the dequantised K, V. Both use one KV head with G query heads.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from pmkvq_accel.model.attention import attention, quantize_query, reference_for
from pmkvq_accel.model.quant import dequantize, quantize


def float_attention(q, k, v, scale):
    s = (q @ k.T) * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p @ v) / p.sum(axis=1, keepdims=True)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--groups", type=int, default=3, help="query heads per KV head (G)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--bits", type=int, default=2, help="body width (sink and a 128-token window are 16-bit)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"G={args.groups} head_dim={args.head_dim} body={args.bits}-bit, best of {args.repeats}")
    print(f"{'tokens':>8} {'golden ms':>10} {'float32 ms':>11} {'ratio':>6} {'err/max|V|':>11}")
    for T in args.tokens:
        x_k = rng.normal(size=(T, args.head_dim)).astype(np.float32)
        x_v = rng.normal(size=(T, args.head_dim)).astype(np.float32)
        cut = [0, 1, max(1, T - 128), T]
        widths = [16, args.bits, 16]
        keys = [quantize(x_k[a:b], w) for a, b, w in zip(cut, cut[1:], widths) if b > a]
        values = [quantize(x_v[a:b], w) for a, b, w in zip(cut, cut[1:], widths) if b > a]
        q = rng.normal(size=(args.groups, args.head_dim)).astype(np.float32)
        scale = 1 / np.sqrt(args.head_dim)
        k32 = np.concatenate([dequantize(b) for b in keys]).astype(np.float32)
        v32 = np.concatenate([dequantize(b) for b in values]).astype(np.float32)
        t_gold = best_of(lambda: attention(quantize_query(q, scale), keys, values), args.repeats)
        t_float = best_of(lambda: float_attention(q, k32, v32, np.float32(scale)), args.repeats)
        query = quantize_query(q, scale)
        err = np.abs(attention(query, keys, values) - reference_for(query, keys, values)).max()
        rel = err / np.abs(v32).max()
        print(f"{T:>8} {t_gold * 1e3:>10.2f} {t_float * 1e3:>11.2f} {t_gold / t_float:>6.2f} {rel:>11.2e}")


if __name__ == "__main__":
    main()
