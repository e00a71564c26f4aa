"""hw/dsp.py's DSP48E2 slice: the behavioural model (what every simulation runs) against a cycle reference
written here from UG579's tables, under random OPMODE/INMODE words, clock enables and extreme operands; and
the primitive's configuration (what synthesis and Vivado get). Amaranth's simulator, no Verilator build."""
import numpy as np
import pytest
from amaranth.hdl import Fragment, Instance, Module
from amaranth.sim import Simulator

from pmkvq_accel.hw.dsp import PRIMITIVES, DspSlice

MASK48 = (1 << 48) - 1

# UG579 (UltraScale Architecture DSP Slice), OPMODE: W[8:7] 00 = 0, 01 = P; Z[6:4] 000 = 0, 001 = PCIN,
# 011 = C; Y[3:2] = 01 and X[1:0] = 01: the multiplier. INMODE: [1] = 1 gates A to 0, [2] = 1 enables D;
# with AMULTSEL = "AD" the multiplier's first operand is the pre-adder's D + A.
W_FIELD = {0b00: "0", 0b01: "P"}
Z_FIELD = {0b000: "0", 0b001: "PCIN", 0b011: "C"}
INMODES = {0b00000: "A", 0b00110: "D"}


def _wrap48(v):
    v &= MASK48
    return v - (1 << 48) if v >> 47 else v


def _operand(rng, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return int(rng.choice([lo, hi])) if rng.random() < 0.3 else int(rng.integers(lo, hi + 1))


def test_model_matches_ug579_reference():
    """Two slices, the second's PCIN the first's PCOUT, each cycle random words for both, random clock
    enables and operands (the extremes often, so that P wraps)."""
    m = Module()
    m.submodules.s0 = s0 = DspSlice()
    m.submodules.s1 = s1 = DspSlice()
    m.d.comb += s1.pcin.eq(s0.pcout)
    rng = np.random.default_rng(11)
    n = 600
    words = [(w << 7) | (z << 4) | 0b0101 for w in W_FIELD for z in Z_FIELD]
    mismatches = []

    async def bench(ctx):
        state = [dict(m=0, p=0), dict(m=0, p=0)]
        for t in range(n):
            ins = []
            for k, s in enumerate((s0, s1)):
                v = dict(a=_operand(rng, 27), d=_operand(rng, 27), b=_operand(rng, 18),
                         c=int(rng.integers(-(1 << 47), 1 << 47)), op=int(rng.choice(words)),
                         im=int(rng.choice(list(INMODES))), cem=bool(rng.random() < 0.8),
                         cep=bool(rng.random() < 0.8))
                ctx.set(s.a, v["a"]); ctx.set(s.d, v["d"]); ctx.set(s.b, v["b"]); ctx.set(s.c, v["c"] & MASK48)
                ctx.set(s.opmode, v["op"]); ctx.set(s.inmode, v["im"])
                ctx.set(s.ce_m, int(v["cem"])); ctx.set(s.ce_p, int(v["cep"]))
                ins.append(v)
            await ctx.tick()
            pcin = [0, state[0]["p"]]          # s0's PCIN is tied to 0 by the test's wiring
            new = []
            for k, v in enumerate(ins):
                st = state[k]
                w = {"0": 0, "P": st["p"]}[W_FIELD[v["op"] >> 7]]
                z = {"0": 0, "PCIN": pcin[k], "C": v["c"]}[Z_FIELD[(v["op"] >> 4) & 7]]
                pre = v["d"] if INMODES[v["im"]] == "D" else v["a"]
                new.append(dict(m=pre * v["b"] if v["cem"] else st["m"],
                                p=_wrap48(w + st["m"] + z) if v["cep"] else st["p"]))
            state = new
            got = (ctx.get(s0.p), ctx.get(s1.p))
            if got != (state[0]["p"], state[1]["p"]):
                mismatches.append((t, got, (state[0]["p"], state[1]["p"])))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert not mismatches, mismatches[:5]


def test_primitive_configuration():
    inst = Fragment.get(DspSlice(), PRIMITIVES)
    assert isinstance(inst, Instance) and inst.type == "DSP48E2"
    p = inst.parameters
    # no input registers (the fabric registers the operands), M and P registered, no control registers
    for name, want in [("AREG", 0), ("BREG", 0), ("CREG", 0), ("DREG", 0), ("ADREG", 0), ("MREG", 1), ("PREG", 1),
                       ("OPMODEREG", 0), ("ALUMODEREG", 0), ("INMODEREG", 0), ("CARRYINREG", 0),
                       ("CARRYINSELREG", 0)]:
        assert p[name] == want, name
    assert (p["USE_MULT"], p["AMULTSEL"], p["PREADDINSEL"], p["BMULTSEL"], p["USE_SIMD"]) == \
        ("MULTIPLY", "AD", "A", "B", "ONE48")
    ports = {name: val for name, (val, _kind) in inst.ports.items()}
    assert ports["ALUMODE"].value == 0 and ports["CARRYINSEL"].value == 0    # Z + W + X + Y + CIN, CIN = 0
    assert inst.attrs.get("pmkvq_explicit") == 1                             # not repacked by synth_report


@pytest.mark.parametrize("platform", [None, PRIMITIVES])
def test_elaborates(platform):
    assert Fragment.get(DspSlice(), platform) is not None
