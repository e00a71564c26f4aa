"""Benchmark: the kernel's AXI read bandwidth during ATTENTION, in simulation with an HBM-like memory model
(fixed read latency, any number of bursts in flight).

Run: python sim/bench_kernel.py [--word-bits 512] [--latency 100] [--tokens 1024 4096]
Prints, per case: cycles of the launch (start to ap_done, seen by polling), words read, and words per cycle
(the fraction of the port's peak, one word per cycle), and whether the read data channel ever idled between
its first and last beat. Builds the kernel with Verilator first (minutes at 512 bits).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pmkvq_accel.sim import runner
from pmkvq_accel.sim.kernel_build import build_kernel


def main(argv=None):
    ap = argparse.ArgumentParser(description="kernel read bandwidth in simulation")
    ap.add_argument("--word-bits", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--latency", type=int, default=100, help="read latency in cycles")
    ap.add_argument("--heads", type=int, default=3, help="KV heads per launch (one layer; SmolLM2 has 3)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--verbose", action="store_true", help="print the first AXI read requests")
    args = ap.parse_args(argv)
    print(f"building the kernel: {args.word_bits}-bit words, head_dim {args.head_dim}, G {args.groups} ...",
          flush=True)
    bdir = build_kernel(word_bits=args.word_bits, head_dim=args.head_dim, groups=args.groups,
                        max_tokens=max(args.tokens))
    cases = [dict(n_heads=args.heads, n_sink=1, n_body=t - 129, n_window=128, k_bits=b, v_bits=b)
             for t in args.tokens for b in args.bits]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        runner.run(bdir, "pmkvq_accel.sim.tb_kernel", Path(tmp) / "run",
                   dict(head_dim=args.head_dim, groups=args.groups, cases=cases, latency=args.latency,
                        out=str(out), trace=args.verbose), toplevel="pmkvq_attn", testcase="run_bandwidth")
        rows = json.loads(out.read_text())
    print(f"\n{args.word_bits}-bit port, read latency {args.latency} cycles, G={args.groups}, "
          f"head_dim {args.head_dim}, {args.heads} KV heads per launch (sink 1 + body + window 128 tokens each)")
    print(f"{'tokens':>7} {'bits':>5} {'cycles':>8} {'words':>8} {'words/cycle':>12}")
    for r in rows:
        t = r["n_sink"] + r["n_body"] + r["n_window"]
        print(f"{t:>7} {r['k_bits']:>5} {r['cycles']:>8.0f} {r['words']:>8} {r['words'] / r['cycles']:>12.3f}"
              f"   (R span {r['r_span']}, {r['r_gaps']} gaps, {r['r_gap_cycles']} idle cycles)")
        if args.verbose:
            print(r["ar"])
            print("start, first AR, first R, last R, done seen:", r["timeline"])
            print("debug register changes (cycle, value):", r["trace"])


if __name__ == "__main__":
    main()
