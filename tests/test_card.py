"""hw/card.py (the whole-card plan: engines per SLR, PCs per engine, composed resources) and sim/hbm.py's
HbmModel figures. Pure Python, fast."""
import json

import pytest

from pmkvq_accel.hw import card as C
from pmkvq_accel.hw import regmap as R
from pmkvq_accel.hw.kernel import KernelConfig
from pmkvq_accel.sim.hbm import HbmModel

# an engine with one DSP per product (1 640 DSP48E2), as a big-engine example for the planner
BIG_ENGINE = C.EngineResources(lut=65_914, ff=45_727, dsp=1_640, bram36=49.5, uram=58, source="test")


def test_unpacked_engine_fits_one_per_slr():
    """1 640 DSP48E2 per engine: two would exceed 90 % of any SLR's DSPs, so the card holds three."""
    p = C.plan(BIG_ENGINE)
    assert p.engines_per_slr == {"SLR0": 1, "SLR1": 1, "SLR2": 1}
    assert p.pcs_per_engine == 10 and p.engine_pcs(2) == tuple(range(20, 30))
    assert [p.engine_slr(e) for e in range(3)] == ["SLR0", "SLR1", "SLR2"]
    assert not p.violations()
    assert not C.fits(2, BIG_ENGINE, "SLR2")


def test_todays_engine_plan():
    """441 DSP48E2, ~54k LUT: 5 / 5 / 5 engines (SLR1, with the fewest LUTs and the slices of SLR2's masters, just
    within 75 %); one more engine in any SLR breaks its LUT limit (and its DSP limit too)."""
    p = C.plan()
    assert p.engines_per_slr == {"SLR0": 5, "SLR1": 5, "SLR2": 5} and p.pcs_per_engine == 2
    assert p.slr_stages() == (0,) * 5 + (2,) * 5 + (4,) * 5 and not p.violations()
    for slr in C.SLRS:
        more = C.CardPlan(C.TODAY_ENGINE, {**p.engines_per_slr, slr: p.engines_per_slr[slr] + 1}, 2)
        broken = [v.split(":")[0] for v in more.violations()]
        assert broken[0] == f"{slr} lut" and f"{slr} dsp" in broken


def test_plan_is_not_blocked_by_filling_slr0_first():
    """Six engines fit SLR0 alone at a larger engine, but the masters of SLR1 and SLR2 put their slices in SLR0
    too: the plan is the most engines of any split, not a greedy SLR0-first fill."""
    big = C.EngineResources(lut=58_000, ff=42_000, dsp=429, bram36=43.5, uram=30, source="test")
    assert not C.CardPlan(big, {"SLR0": 5, "SLR1": 0, "SLR2": 0}, 6).violations()
    p = C.plan(big)
    assert p.engines_per_slr == {"SLR0": 4, "SLR1": 4, "SLR2": 4} and not p.violations()   # greedy: 5 / 1 / 0
    assert all(C.CardPlan(big, split, 2).violations() for split in C._splits(13))


def test_lean_engine_fills_the_card_and_respects_limits():
    lean = C.EngineResources(lut=30_000, ff=30_000, dsp=400, bram36=20, uram=10, source="test")
    p = C.plan(lean)
    assert p.engines == 17 and p.engines_per_slr == {"SLR0": 5, "SLR1": 6, "SLR2": 6}   # bound by the DSPs
    assert not p.violations()
    assert p.slr_stages() == (0,) * 5 + (2,) * 6 + (4,) * 6     # 2 register stages per SLR boundary crossed
    res = p.resources()
    # the composition: engines x engine + glue (SLR0) + slices of every crossing master
    cross = p.crossings()
    for s in C.SLRS:
        want = p.engines_per_slr[s] * lean.lut + cross[s] * C.SLR_CROSSING.lut + (C.KERNEL_GLUE.lut if s == "SLR0" else 0)
        assert res["per_slr"][s]["lut"]["used"] == want
    assert p.pcs_per_engine == 1
    p16 = C.plan(lean, max_engines=16)
    assert p16.engines == 16 and p16.pcs_per_engine == 2 and p16.engines * p16.pcs_per_engine <= C.HBM_PCS


def test_forced_engine_count_over_the_limit_is_reported():
    p = C.plan(engines=16)
    assert p.engines == 16 and p.violations()
    with pytest.raises(ValueError):
        C.plan(engines=33)
    with pytest.raises(ValueError):
        C.plan(engines=4, pcs_per_engine=9)


def test_crossings_count_boundaries():
    p = C.plan(BIG_ENGINE, engines=3)
    # engine 1 (SLR1) crosses SLR1|SLR0, engine 2 (SLR2) crosses SLR2|SLR1 and SLR1|SLR0
    assert p.crossings() == {"SLR0": 2, "SLR1": 3, "SLR2": 1}


def test_engine_resources_from_report(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"resources": {"LUT": 40_000, "FF": 1, "DSP": 800, "BRAM36": 10, "URAM": 4}}))
    r = C.EngineResources.from_report(f)
    assert (r.lut, r.dsp, r.bram36, r.uram) == (40_000, 800, 10.0, 4) and str(f) in r.source
    f.write_text(json.dumps({"lut": 0, "dsp": 3}))
    with pytest.raises(ValueError, match="lut"):
        C.EngineResources.from_report(f)


def test_compute_bound_arithmetic():
    """2-bit bodies: a byte holds 4 codes, each G MACs; the card's DSPs at 2 MACs each per cycle."""
    c = C.compute_bound(groups=3, body_bits=2, dsp=1000, macs_per_dsp=2, clock_mhz=200)
    assert c["macs_per_byte"] == 12 and c["macs_per_cycle"] == 2000
    assert c["gbps"] == pytest.approx(2000 * 200e6 / 12 / 1e9)


def test_hbm_model_figures():
    m = HbmModel()
    assert m.clock_mhz == C.CARD_CLOCK_MHZ == 225
    assert m.pc_gbps == pytest.approx(14.375 * 0.92)
    assert m.pc_bytes_per_cycle == pytest.approx(14.375e9 * 0.92 / 225e6)
    assert m.read_latency == 68 and m.cross_latency == 23                 # 300 ns, 100 ns at 225 MHz
    assert m.cross_beat_cost == pytest.approx(64 * 2)                     # half the bandwidth across
    assert m.port_words_per_cycle() == pytest.approx(58.78 / 64, rel=1e-3)
    assert HbmModel(clock_mhz=300).port_words_per_cycle() == pytest.approx(0.689, rel=1e-3)
    ideal = HbmModel.fixed_latency(100)
    assert ideal.read_latency == 100 and ideal.ideal and ideal.cross_latency == 0
    assert ideal.harness_args()[2] != m.harness_args()[2]
    with pytest.raises(ValueError):
        HbmModel(cross_efficiency=0.95)


# ---- sim/bench_card.py's bookkeeping (the RTL runs are `make bench-card`) ----
def test_bench_card_slices_and_bytes():
    from pmkvq_accel.sim import bench_card as BC
    shape = BC.SHAPES["llama-8b"]
    sl = BC.engine_slices(32768, 3)
    assert len(sl) == 3 and sum(t for s in sl for t in s) == 32768
    assert sl[0][0] == 1 and all(s[0] == 0 for s in sl[1:])          # the sink in engine 0
    assert sum(1 for s in sl if s[2]) == 1                           # one engine holds the filling window
    assert all(s[1] % BC.WINDOW == 0 for s in sl)                   # bodies are whole windows
    assert max(s[1] for s in sl) - min(s[1] for s in sl) <= BC.WINDOW
    h = BC.heaviest(sl, shape, 2, 2)
    assert BC.kv_bytes(shape, *h, 2, 2) == max(BC.kv_bytes(shape, *s, 2, 2) for s in sl)
    # 1 token at 16 bits, keys and values, 8 heads: codes 2 x 128 x 2 bytes + 2 metadata words
    assert BC.kv_bytes(shape, 1, 0, 0, 16, 16) == 8 * (2 * 128 * 2 + 8)
    assert BC.kv_bytes(shape, 0, 64, 0, 2, 4) == 8 * (64 * 128 * 6 // 8 + 64 * 8)


def test_bench_card_mix_is_the_committed_table():
    import json
    from pmkvq_accel.sim import bench_card as BC
    t = json.loads(BC.TABLE.read_text())["layers"]
    w30 = BC.table_widths(30)
    assert w30 == [(x["key_bits"], x["value_bits"]) for x in t]
    w32 = BC.table_widths(32)
    assert len(w32) == 32 and set(w32) <= set(w30) and w32[0] == w30[0] and w32[-1] == w30[-1]


def test_engine_buffers_are_one_uram_deep():
    """The kernel's default token limit keeps the datapath's buffers at 4 096 entries (one URAM288 deep);
    one token more takes a second URAM in depth (docs/hardware.md, "Memories")."""
    assert KernelConfig().datapath.entries == R.BUFFER_ENTRIES == 4096
    assert KernelConfig(max_tokens=R.ENGINE_MAX_TOKENS + 1).datapath.entries == R.BUFFER_ENTRIES + 1


def test_each_shape_plans_with_its_own_measured_engine():
    """The 7B-class engine (552 DSP48E2) fills fewer SLR slots than the SmolLM2 one: bench_card and bitstream plan
    each shape with its own measured engine, and a shape without one is refused unless the count is forced."""
    from pmkvq_accel.hw import bitstream as B
    from pmkvq_accel.sim import bench_card as BC
    assert C.engine_for(64, 3) is C.TODAY_ENGINE and C.engine_for(128, 4) is C.TODAY_ENGINE_7B
    assert C.engine_for(64, 1) is None
    args = BC.argparse.Namespace(engine_report=None, engines=None, clock_mhz=C.CARD_CLOCK_MHZ)
    small, big = (BC.shape_plan(BC.SHAPES[k], args)[1] for k in ("smollm2-135m", "llama-8b"))
    assert small.engines == 15 and big.engines < small.engines and not big.violations()
    assert B.main(["--head-dim", "64", "--groups", "1", "--out", "/nonexistent/never"], path="") == 2
