"""Projection of the whole U280 from the RTL: decode-attention time per token over every HBM pseudo-channel.

    python sim/bench_card.py --json PATH [--plot PNG] [--engine-report resources.json] [--clock-mhz 225] ...
    (make bench-card)

The card runs N engines (hw/card.py plans how many fit), each with its own AXI master on its own PCs; the KV
cache of every layer is striped over the engines by tokens, so each engine runs one ATTENTION launch per layer
over its own token slice of every KV head, and the host merges the partials. The engines share nothing (own
port, own PCs), so the card's time for a layer is the slowest engine's. This bench measures that engine's
kernel cycles on the RTL (Verilator, the fast C++ harness, sim/kernel_sim.py) under the HBM model of
sim/hbm.py, and projects:

    time per decode step = layers x (cycles / clock + per-launch host overhead)
    floor = KV bytes of the step / 425 GB/s          utilization = floor / time

Assumptions it adds, all printed: the clock (`--clock-mhz`, hw/card.CARD_CLOCK_MHZ), the HBM model (sim/hbm.py),
the host overhead per launch (`--launch-overhead-us`), the split of a layer's tokens (hw/regmap.slices), the
per-engine resources of each shape (`--engine-report` for all, or the shape's measured engine,
hw/card.engine_for: the card holds fewer 7B-shape engines) and, for the "mix" rows, the committed
table's final widths per layer (calib/tables/SmolLM2-135M-Instruct.json; the 7B shape takes layer
floor(i * 30 / 32)'s). KV bytes = codes of sink (16-bit), body (b-bit) and window (16-bit) plus the 32-bit
scale/zero word per token, keys and values, every KV head of every layer (queries and partials not counted).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmkvq_accel.hw import card as C
from pmkvq_accel.hw import regmap as R
from pmkvq_accel.hw.kernel import KernelConfig

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "calib" / "tables" / "SmolLM2-135M-Instruct.json"
# the sink and the 16-bit window of the committed table's cache (calib/tables/...: "cache")
_CACHE = json.loads(TABLE.read_text()).get("cache", {}) if TABLE.is_file() else {}
N_SINK, WINDOW = int(_CACHE.get("n_sink", 1)), int(_CACHE.get("window", 128))
# XRT's xrt::run start + wait on an Alveo card, steady state: ~16-17 us (Xilinx/XRT issue #6601, U25);
# 20 us per launch is the default assumption.
LAUNCH_OVERHEAD_US = 20.0


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    groups: int


SHAPES = {
    "smollm2-135m": Shape("SmolLM2-135M", 30, 3, 64, 3),
    "llama-8b": Shape("DeepSeek-R1-Distill-Llama-8B", 32, 8, 128, 4),
}


def kv_bytes(shape: Shape, n_sink: int, n_body: int, n_window: int, k_bits: int, v_bits: int) -> int:
    """KV bytes one ATTENTION over these blocks reads for all KV heads of ONE layer (codes + metadata)."""
    hd = shape.head_dim
    codes = (n_sink + n_window) * hd * 2 * 2 + n_body * hd * (k_bits + v_bits) // 8
    meta = (n_sink + n_body + n_window) * 4 * 2
    return shape.kv_heads * (codes + meta)


def engine_slices(context: int, engines: int) -> list[tuple[int, int, int]]:
    """(n_sink, n_body, n_window) of every engine for a layer of `context` tokens: the contract's striping
    (hw/regmap.slices: whole windows dealt round-robin, the sink in engine 0, the filling window (1..WINDOW
    tokens) in the engine it will join)."""
    from pmkvq_accel.hw import regmap as R
    from pmkvq_accel.model.cache import CacheConfig, Occupancy
    blocks = (context - N_SINK - 1) // WINDOW
    if blocks < 0:
        raise ValueError(f"context {context} is shorter than the sink + 1 token")
    occ = Occupancy(CacheConfig(n_kv_heads=1, head_dim=64, n_sink=N_SINK, window=WINDOW), sink=N_SINK,
                    body=blocks * WINDOW, window=context - N_SINK - blocks * WINDOW)
    if hasattr(R, "slices"):
        return R.slices(occ, engines)
    # the same rule, for a tree whose regmap predates striping (the RTL measured in docs/card.md)
    return [(occ.sink if e == 0 else 0, (blocks // engines + (e < blocks % engines)) * WINDOW,
             occ.window if blocks % engines == e else 0) for e in range(engines)]


def heaviest(sl: list[tuple[int, int, int]], shape: "Shape", k_bits: int, v_bits: int) -> tuple[int, int, int]:
    """The slice that reads the most bytes: the engine that finishes last."""
    return max(sl, key=lambda t: (kv_bytes(shape, *t, k_bits, v_bits), t))


def table_widths(layers: int, table: Path = TABLE) -> list[tuple[int, int]]:
    """(key bits, value bits) per layer: the committed table's final widths, stretched to `layers`."""
    t = json.loads(Path(table).read_text())["layers"]
    return [(t[i * len(t) // layers]["key_bits"], t[i * len(t) // layers]["value_bits"]) for i in range(layers)]


def launch_image(heads, n_sink: int, n_body: int, n_window: int, engines: int = 1):
    """Engine 0's memory image and registers for an ATTENTION launch over `heads` (sim/kernel_image.py); the
    other engines of an `engines`-engine kernel get empty slices: ([(address, bytes, engine, "cache" or
    "records") for every engine's two buffers], {address: bytes}, [(offset, bits, value)])."""
    from pmkvq_accel.sim import kernel_image as KI
    caps = dict(sink_cap=max(n_sink, 1), window_cap=max(n_window, 16), body_cap=max(n_body, 16))
    empty = [KI.Head((None, None, None), (None, None, None), h.query) for h in heads]
    img = KI.build_image([heads] + [empty] * (engines - 1), **caps)
    regs = R.all_args(engines)
    buffers = [(a, n, e, kind) for e in range(engines) for (a, n), kind in zip(img.buffers(e), ("cache", "records"))]
    return buffers, img.mem, [(*regs[n], v) for n, v in img.args.items()]


class EngineBench:
    """One engine's kernel (1 engine, 512-bit, the shape's head_dim and G, `pcs_per_engine` PCs) on the fast
    harness; its cache in its first pseudo-channel, its records in `regmap.record_pc`, as the host puts them."""

    def __init__(self, shape: Shape, hbm, pcs_per_engine: int, max_tokens: int = R.ENGINE_MAX_TOKENS,
                 word_bits: int = 512, progress=print):
        from pmkvq_accel.sim.kernel_sim import KernelSim
        self.shape, self.hbm = shape, hbm
        self.cfg = KernelConfig(engines=1, pcs_per_engine=pcs_per_engine, word_bits=word_bits,
                                head_dim=shape.head_dim, groups=shape.groups, max_tokens=max_tokens)
        pcs = self.cfg.engine_pcs(0)
        self.pc = {"cache": pcs[0], "records": R.record_pc(pcs)}
        t = time.monotonic()
        progress(f"  building/starting the {word_bits}-bit kernel: head_dim {shape.head_dim}, G {shape.groups} "
                 "(Verilator: minutes the first time, cached in sim_build/) ...")
        self.sim = KernelSim(self.cfg, hbm=hbm)
        progress(f"  ready ({time.monotonic() - t:.0f} s)")
        self.rng = np.random.default_rng(0)
        self.cache = {}

    def cycles(self, n_sink: int, n_body: int, n_window: int, k_bits: int, v_bits: int) -> dict:
        key = (n_sink, n_body, n_window, k_bits, v_bits)
        if key in self.cache:
            return self.cache[key]
        from pmkvq_accel.hw import regmap as R
        from pmkvq_accel.model.attention import quantize_query
        from pmkvq_accel.model.quant import quantize
        from pmkvq_accel.sim.kernel_image import Head
        s, hd, G = self.shape, self.shape.head_dim, self.shape.groups
        heads = []
        for _ in range(s.kv_heads):
            def blocks(bits, n=(n_sink, n_body, n_window)):
                return tuple(quantize(self.rng.normal(size=(t, hd)).astype(np.float32), b) if t else None
                             for t, b in zip(n, (16, bits, 16)))
            q = quantize_query(self.rng.normal(size=(G, hd)), 1 / math.sqrt(hd))
            heads.append(Head(blocks(k_bits), blocks(v_bits), q))
        bufs, mem, regs = launch_image(heads, n_sink, n_body, n_window)
        for addr, size, _, kind in bufs:    # replace the previous launch's regions (same addresses)
            self.sim.add_region(addr, size, pc=self.pc[kind])
        for addr, data in mem.items():
            if data:
                self.sim.write(addr, data)
        for off, bits, value in regs:
            self.sim.write_reg(off, value & 0xFFFFFFFF)
            if bits == 64:
                self.sim.write_reg(off + 4, value >> 32)
        before = self.sim.counters()
        self.sim.write_reg(R.CTRL, R.AP_START)
        done = self.sim.wait_done()
        if not done & R.AP_DONE:
            raise RuntimeError(f"no ap_done for {key}")
        status = self.sim.read_reg(R.STATUS)
        after = self.sim.counters()
        if status != R.STATUS_OK or after["faults"] != before["faults"]:
            raise RuntimeError(f"launch {key}: status {status}, faults {after['faults'] - before['faults']}")
        port = self.sim.port_stats(0)
        cycles = after["kernel_cycles"] - before["kernel_cycles"]
        # lead: ap_start written -> first read beat (the read latency); tail: last read beat -> ap_done seen
        # (the datapath's drain, the last head's partial records, the write response). +-2 cycles: the
        # AXI4-Lite write and read that bound the kernel cycles.
        lead = port["r_first"] - before["cycles"] if port["r_beats"] else cycles
        span = port["r_last"] - port["r_first"] + 1 if port["r_beats"] else 0
        out = {"cycles": cycles, **port, "r_lead": lead, "r_tail": cycles - lead - span}
        self.cache[key] = out
        return out

    def close(self):
        self.sim.close()


def shape_plan(shape: Shape, args) -> tuple[C.EngineResources, C.CardPlan]:
    """The card for one model shape: its measured engine (or --engine-report) planned over the SLRs."""
    engine = (C.EngineResources.from_report(args.engine_report) if args.engine_report
              else C.engine_for(shape.head_dim, shape.groups))
    if engine is None:
        raise SystemExit(f"no measured engine for head_dim {shape.head_dim}, G {shape.groups}: pass --engine-report")
    return engine, C.plan(engine, engines=args.engines, clock_mhz=args.clock_mhz)


def project(args, progress=print) -> dict:
    from pmkvq_accel.sim.hbm import HbmModel
    hbm = HbmModel(clock_mhz=args.clock_mhz)
    progress(f"  {hbm.describe()}")
    progress(f"  host overhead {args.launch_overhead_us:g} us per launch; tokens striped by windows "
             "(hw/regmap.slices), the heaviest engine measured")
    rows, cards = [], {}
    for mkey in args.models:
        shape = SHAPES[mkey]
        engine, plan = shape_plan(shape, args)
        N = plan.engines
        res = plan.resources()
        tot = res["total"]
        cards[shape.name] = {"engines": N, "engines_per_slr": plan.engines_per_slr,
                             "pcs_per_engine": plan.pcs_per_engine, "engine_resources": engine.source,
                             "resources": {"lut": tot["lut"], "dsp": tot["dsp"], "bram36": tot["bram36"],
                                           "uram": tot["uram"]},
                             "resources_per_slr": {s: {k: round(v["used"], 1) for k, v in r.items()}
                                                   for s, r in res["per_slr"].items()}}
        progress(f"card for {shape.name} (head_dim {shape.head_dim}, G {shape.groups}): {N} engines "
                 f"({', '.join(f'{s} {n}' for s, n in plan.engines_per_slr.items())}), "
                 f"{plan.pcs_per_engine} PCs each, {args.clock_mhz:g} MHz; engine resources: {engine.source}")
        for v in plan.violations():
            progress(f"  WARNING over the placement limit: {v}")
        bench = EngineBench(shape, hbm, plan.pcs_per_engine, progress=progress)
        try:
            widths = [("uniform", b, [(b, b)] * shape.layers) for b in args.bits]
            if not args.no_mix:
                widths.append(("mix", "mix", table_widths(shape.layers)))
            for ctx in args.contexts:
                for label, bits, per_layer in widths:
                    t_step, nbytes, cyc_layers = 0.0, 0, []
                    for kb, vb in per_layer:
                        sl = engine_slices(ctx, N)
                        t0 = time.monotonic()
                        worst = bench.cycles(*heaviest(sl, shape, kb, vb), kb, vb)
                        if args.verbose and time.monotonic() - t0 > 0.5:
                            progress(f"    {shape.name} {ctx} slice {heaviest(sl, shape, kb, vb)} {kb}/{vb}: "
                                     f"{worst['cycles']} cycles, {worst['r_beats']} words "
                                     f"({time.monotonic() - t0:.1f} s)")
                        cyc_layers.append(worst)
                        t_step += worst["cycles"] / args.clock_mhz + args.launch_overhead_us
                        nbytes += sum(kv_bytes(shape, *t, kb, vb) for t in sl)
                    floor = nbytes / (C.CARD_GBPS * 1e3)     # bytes / (GB/s) -> us
                    kern = sum(c["cycles"] for c in cyc_layers) / args.clock_mhz
                    row = {"model": shape.name, "context": ctx, "body_bits": bits, "engines": N, "bytes": nbytes,
                           "cycles_per_engine": (cyc_layers[0]["cycles"] if label == "uniform"
                                                 else round(sum(c["cycles"] for c in cyc_layers) / shape.layers)),
                           "time_us": round(t_step, 2), "floor_us": round(floor, 2),
                           "utilization": round(floor / t_step, 4),
                           "kernel_us": round(kern, 2), "utilization_kernel_only": round(floor / kern, 4),
                           "engine_words_per_cycle": round(sum(c["r_beats"] for c in cyc_layers)
                                                           / sum(c["cycles"] for c in cyc_layers), 4)}
                    rows.append(row)
                    progress(f"  {shape.name:<30} {ctx:>6} {str(bits):>4}  {nbytes / 1e6:>9.2f} MB  "
                             f"{row['cycles_per_engine']:>9} cyc  {row['time_us']:>10.1f} us  floor "
                             f"{row['floor_us']:>9.1f} us  util {row['utilization']:.3f} "
                             f"(kernel only {row['utilization_kernel_only']:.3f}, "
                             f"{row['engine_words_per_cycle']:.3f} words/cycle/engine)")
        finally:
            bench.close()
    first = cards[SHAPES[args.models[0]].name]     # the top-level figures: the first model's card
    return {"clock_mhz": args.clock_mhz, "engines": first["engines"], "resources": first["resources"],
            "rows": rows,
            "cards": cards,
            "assumptions": {"hbm": hbm.describe(), "card_gbps_floor": C.CARD_GBPS,
                            "launch_overhead_us": args.launch_overhead_us,
                            "split": "whole windows round-robin over the engines (hw/regmap.slices); the "
                                     "engine with the most bytes measured",
                            "sink": N_SINK, "window": WINDOW,
                            "mix": "committed table final widths (calib/tables/SmolLM2-135M-Instruct.json)"},
            "resources_per_slr": first["resources_per_slr"]}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in result["rows"]})
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for j, m in enumerate(models):
        rows = [r for r in result["rows"] if r["model"] == m]
        for bits in dict.fromkeys(r["body_bits"] for r in rows):
            rs = sorted((r for r in rows if r["body_bits"] == bits), key=lambda r: r["context"])
            x = [r["context"] for r in rs]
            lab = f"{bits}-bit body" if bits != "mix" else "table mix"
            axes[0][j].plot(x, [r["utilization"] for r in rs], "o-", label=lab)
            axes[1][j].plot(x, [r["time_us"] / 1e3 for r in rs], "o-", label=lab)
        axes[0][j].axhline(0.8, color="grey", ls=":", lw=1)
        axes[0][j].set_title(f"{m} ({rows[0]['engines']} engines): utilization of 425 GB/s")
        axes[1][j].set_title(f"{m}: attention time per token (all layers)")
        axes[1][j].set_ylabel("ms")
        for a in (axes[0][j], axes[1][j]):
            a.set_xscale("log", base=2)
            a.set_xlabel("context (tokens)")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
    fig.suptitle(f"U280 projection at {result['clock_mhz']:g} MHz, "
                 f"{result['assumptions']['launch_overhead_us']:g} us per launch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="write the result here")
    ap.add_argument("--plot", type=Path, help="matplotlib figure (utilization, time per token vs context)")
    ap.add_argument("--clock-mhz", type=float, default=C.CARD_CLOCK_MHZ)
    ap.add_argument("--engines", type=int, help="force the engine count (default: as many as fit, hw/card.py)")
    ap.add_argument("--engine-report", type=Path,
                    help="per-engine resources from a synthesis report (JSON) for every model; default each shape's "
                         "measured engine (hw/card.engine_for)")
    ap.add_argument("--launch-overhead-us", type=float, default=LAUNCH_OVERHEAD_US)
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["smollm2-135m", "llama-8b"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4, 2], choices=[16, 8, 4, 2])
    ap.add_argument("--no-mix", action="store_true", help="skip the committed table's mix rows")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    t = time.monotonic()
    result = project(args)
    result["seconds"] = round(time.monotonic() - t, 1)
    result["command"] = "python sim/bench_card.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
