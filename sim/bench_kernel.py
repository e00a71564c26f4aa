"""Benchmark: the kernel's AXI read bandwidth during ATTENTION, on the RTL (Verilator, the fast C++ harness of
sim/kernel_sim.py) under the HBM model of sim/hbm.py.

Run: python sim/bench_kernel.py [--word-bits 512] [--tokens 1024 4096] [--clock-mhz 225] [--latency N]
One engine, one ATTENTION launch of `--heads` KV heads (one SmolLM2 layer: 3), each a 1-token sink, a
128-token 16-bit window and the body at each width; the cache in the engine's first pseudo-channel, the query and
partial records in its second (hw/regmap.record_pc: as the host places them). Prints, per
case: kernel cycles (ap_start written -> ap_done seen), 512-bit words read, words per cycle and its share of
what one PC can supply under the model, the R channel's idle cycles between its first and last beat, the lead
(start -> first read beat) and tail (last read beat -> done), the words written (partial records) and reads plus
writes as a share of one PC's supply.
`--latency N`: the former memory instead (fixed N-cycle latency, no bandwidth limit).
Builds the kernel with Verilator first (minutes at 512 bits, cached in sim_build/).
"""
from __future__ import annotations

import argparse

from pmkvq_accel.hw import card as C
from pmkvq_accel.hw import regmap as R
from pmkvq_accel.sim.bench_card import EngineBench, Shape
from pmkvq_accel.sim.hbm import HbmModel


def main(argv=None):
    ap = argparse.ArgumentParser(description="kernel read bandwidth in simulation (HBM model)")
    ap.add_argument("--word-bits", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--clock-mhz", type=float, default=C.CARD_CLOCK_MHZ, help="kernel clock of the HBM model")
    ap.add_argument("--latency", type=int, default=None,
                    help="use a fixed-latency memory with no bandwidth limit instead of the HBM model")
    ap.add_argument("--heads", type=int, default=3, help="KV heads per launch (one layer; SmolLM2 has 3)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--pcs-per-engine", type=int, default=C.plan().pcs_per_engine,
                    help="the engine's pseudo-channels (default: the card plan's); with 1 the partial records "
                         "share the cache's PC")
    args = ap.parse_args(argv)
    hbm = HbmModel.fixed_latency(args.latency, args.clock_mhz) if args.latency is not None else \
        HbmModel(clock_mhz=args.clock_mhz)
    shape = Shape("bench", 1, args.heads, args.head_dim, args.groups)
    bench = EngineBench(shape, hbm, args.pcs_per_engine, word_bits=args.word_bits)
    rows = []
    try:
        for t in args.tokens:
            for b in args.bits:
                rows.append((t, b, bench.cycles(1, t - 129, 128, b, b)))
    finally:
        bench.close()
    supply = hbm.port_words_per_cycle() if not hbm.ideal else 1.0
    # the query records come from the records PC when the engine has a second one: not the cache PC's supply
    pcs = bench.cfg.engine_pcs(0)
    query_words = args.heads * args.groups * R.query_record_bytes(args.head_dim) * 8 // args.word_bits \
        if R.record_pc(pcs) != pcs[0] else 0
    print(f"\n{args.word_bits}-bit port, {hbm.describe()}; one PC supplies {supply:.3f} words/cycle; "
          f"G={args.groups}, head_dim {args.head_dim}, {args.heads} KV heads per launch "
          f"(sink 1 + body + window 128 tokens each)")
    print(f"engine PCs {pcs}: cache in PC {pcs[0]}, records in PC {R.record_pc(pcs)}")
    print("| tokens | body bits | cycles | words read | words/cycle | cache-PC reads of supply "
          "| R idle between first and last beat "
          "| lead (start -> first beat) | tail (last beat -> done) | words written | read + written of supply |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t, b, r in rows:
        rate = r["r_beats"] / r["cycles"]
        cache = (r["r_beats"] - query_words) / r["cycles"]
        both = (r["r_beats"] + r["w_beats"]) / r["cycles"]
        print(f"| {t} | {b} | {r['cycles']} | {r['r_beats']} | {rate:.3f} | {cache / supply:.3f} | {r['r_idle']} "
              f"| {r['r_lead']} | {r['r_tail']} | {r['w_beats']} | {both / supply:.3f} |")


if __name__ == "__main__":
    main()
