"""Throughput of the whole datapath in simulation: cycles for a context of T tokens versus the ideal
(one beat per cycle), at every code width and both head_dims, bit-checked against the golden model. Runs on
the C++ harness (sim/fastsim.py), no Python per cycle.

    .venv/bin/python -m pmkvq_accel.sim.bench_throughput [--word-bits 512] [--groups 3] [--tokens 1024 4096]

cycles = from the first data word accepted to the first result beat (pipeline fill and drain included;
the G result beats follow, one per cycle). words = words of the job (key metadata + key codes + value
metadata + value codes); ideal = its beats (`hw.jobs.job_beats`: a word each, two for a 2-bit value word
holding more tokens than the value pass's slots); ratio = ideal / cycles. Layout "uniform": keys and values all at the width; "sink16/window16":
16 sink and 16 window tokens at 16 bits around a body at the width.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from pmkvq_accel.hw.config import DatapathConfig
from pmkvq_accel.hw.jobs import decode_result, expected_beats, job_beats, job_descriptor, job_words
from pmkvq_accel.model.attention import attention_partial

from pmkvq_accel.sim.fastsim import FastSim
from pmkvq_accel.sim.jobgen import random_job


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--word-bits", type=int, default=512)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--gap", type=float, default=0.0, help="random valid-gap probability on the data stream")
    args = ap.parse_args(argv)
    rows = []
    print(f"word_bits={args.word_bits} G={args.groups}  (cycles: first word accepted -> result)")
    print(f"{'layout':16} {'width':>5} {'hd':>4} {'T':>6} {'cycles':>8} {'words':>8} {'ideal':>8} {'words/cyc':>9} "
          f"{'ratio':>7}  exact")
    for hd in args.head_dims:
        cfg = DatapathConfig(word_bits=args.word_bits, head_dim=hd, groups=args.groups, max_tokens=args.max_tokens)
        sim = FastSim(cfg)
        for layout in ("uniform", "sink16/window16"):
            for bits in (16, 8, 4, 2):
                for T in args.tokens:
                    rng = np.random.default_rng(T * 100 + bits)
                    edge = 16 if layout != "uniform" else bits
                    q, k, v = random_job(rng, cfg.groups, hd, T, bits, bits, edge_bits=edge)
                    words = job_words(cfg, k, v)
                    t0 = time.time()
                    res = sim.run([(job_descriptor(cfg, q, k, v), words)], gap=args.gap)[0]
                    exp = expected_beats(attention_partial(q, k, v))
                    exact = (len(res["beats"]) == len(exp)
                             and all(decode_result(cfg, b) == e for b, e in zip(res["beats"], exp)))
                    ideal = job_beats(cfg, k, v)
                    ratio = ideal / res["cycles"]
                    rows.append((layout, bits, hd, T, res["cycles"], len(words), ratio, exact))
                    print(f"{layout:16} {bits:5} {hd:4} {T:6} {res['cycles']:8} {len(words):8} {ideal:8} "
                          f"{len(words) / res['cycles']:9.4f} {ratio:7.4f}  {'yes' if exact else 'NO'}   "
                          f"({time.time() - t0:.1f} s)")
    worst = min(r[6] for r in rows if r[3] >= 1024)
    print(f"worst ratio for T >= 1024: {worst:.4f}; all bit-exact: {all(r[7] for r in rows)}")
    return rows


if __name__ == "__main__":
    main()
