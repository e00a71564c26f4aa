"""hw/dsp.py's DSP48E2 slice: the behavioural model against a cycle reference written from UG579 (a chain
of two slices, the second accumulating, under random clock enables), and the primitive's configuration
(the attributes and the OPMODE words the synthesis netlist gets, against UG579's tables written out
here). Amaranth's simulator, no Verilator build."""
import numpy as np
import pytest
from amaranth.hdl import Fragment, Instance, Module, Signal
from amaranth.sim import Simulator

from pmkvq_accel.hw.dsp import PRIMITIVES, MulAdd

MASK48 = (1 << 48) - 1


def _wrap48(v):
    v &= MASK48
    return v - (1 << 48) if v >> 47 else v


def test_model_chain_and_accumulator_match_reference():
    """head: P0 <= M0 + C; tail: P1 <= (P1 if keep else 0) + M1 + PCIN (= P0); M <= A * B; each register
    only where its clock enable is set; P wraps at 48 bits (extreme operands make the accumulator wrap)."""
    m = Module()
    m.submodules.head = head = MulAdd(z="c")
    m.submodules.tail = tail = MulAdd(z="pcin", accumulate=True)
    m.d.comb += tail.pcin.eq(head.pcout)
    rng = np.random.default_rng(11)
    n = 400
    big = [-(1 << 26), (1 << 26) - 1]
    a = [int(rng.choice(big)) if rng.random() < 0.3 else int(rng.integers(-(1 << 26), 1 << 26)) for _ in range(2 * n)]
    b = [int(rng.choice([-(1 << 17), (1 << 17) - 1])) if rng.random() < 0.3 else int(rng.integers(-(1 << 17), 1 << 17))
         for _ in range(2 * n)]
    c = [int(rng.integers(-(1 << 47), 1 << 47)) for _ in range(n)]
    ce = rng.random((n, 4)) < 0.8
    keep = rng.random(n) < 0.9
    mismatches = []

    async def bench(ctx):
        m0 = m1 = p0 = p1 = 0
        for t in range(n):
            ctx.set(head.a, a[2 * t]); ctx.set(head.b, b[2 * t]); ctx.set(head.c, c[t] & MASK48)
            ctx.set(tail.a, a[2 * t + 1]); ctx.set(tail.b, b[2 * t + 1]); ctx.set(tail.keep_p, int(keep[t]))
            ctx.set(head.ce_m, int(ce[t, 0])); ctx.set(head.ce_p, int(ce[t, 1]))
            ctx.set(tail.ce_m, int(ce[t, 2])); ctx.set(tail.ce_p, int(ce[t, 3]))
            await ctx.tick()
            n_p0 = _wrap48(m0 + c[t]) if ce[t, 1] else p0
            n_p1 = _wrap48((p1 if keep[t] else 0) + m1 + p0) if ce[t, 3] else p1
            m0 = a[2 * t] * b[2 * t] if ce[t, 0] else m0
            m1 = a[2 * t + 1] * b[2 * t + 1] if ce[t, 2] else m1
            p0, p1 = n_p0, n_p1
            got = (ctx.get(head.p), ctx.get(tail.p))
            if got != (p0, p1):
                mismatches.append((t, got, (p0, p1)))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert not mismatches, mismatches[:5]


def _instance(slice_):
    frag = Fragment.get(slice_, PRIMITIVES)
    insts = [sub for sub, _name, _loc in frag.subfragments if isinstance(sub, Instance)]
    assert len(insts) == 1
    return insts[0]


# UG579 (UltraScale DSP slice user guide), OPMODE: W[8:7] 00 = 0, 01 = P; Z[6:4] 001 = PCIN, 011 = C;
# Y[3:2] 01 and X[1:0] 01 = the multiplier M
OPMODE = {("c", False): 0b00_011_01_01, ("c", True): 0b01_011_01_01,
          ("pcin", False): 0b00_001_01_01, ("pcin", True): 0b01_001_01_01}


@pytest.mark.parametrize("z", ["c", "pcin"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_primitive_configuration(z, accumulate):
    s = MulAdd(z=z, accumulate=accumulate)
    inst = _instance(s)
    assert inst.type == "DSP48E2"
    p = inst.parameters
    # no input registers (the fabric registers the operands), M and P registered, no control registers
    for reg, want in [("AREG", 0), ("BREG", 0), ("CREG", 0), ("MREG", 1), ("PREG", 1), ("OPMODEREG", 0),
                      ("ALUMODEREG", 0), ("INMODEREG", 0), ("CARRYINREG", 0), ("CARRYINSELREG", 0)]:
        assert p[reg] == want, reg
    assert (p["USE_MULT"], p["AMULTSEL"], p["BMULTSEL"], p["USE_SIMD"]) == ("MULTIPLY", "A", "B", "ONE48")
    ports = {name: val for name, (val, _kind) in inst.ports.items()}
    assert ports["ALUMODE"].value == 0 and ports["INMODE"].value == 0 and ports["CARRYINSEL"].value == 0
    op = ports["OPMODE"]
    seen = {}
    m = Module()
    word = Signal(9)
    m.d.comb += word.eq(op)
    keep = getattr(s, "keep_p", None)

    async def bench(ctx):
        for k in (0, 1):
            if keep is not None:
                ctx.set(keep, k)
            await ctx.delay(1e-9)
            seen[k] = ctx.get(word)
    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    # the W field follows keep_p on an accumulating slice and is 0 otherwise
    assert seen == ({0: OPMODE[z, False], 1: OPMODE[z, True]} if accumulate else {0: OPMODE[z, False], 1: OPMODE[z, False]})


def test_bad_source_rejected():
    with pytest.raises(ValueError, match="z source"):
        MulAdd(z="p")
