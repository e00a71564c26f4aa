"""The split shift/saturate helpers of hw/arith.py (amount registered one stage before the shift) against
the golden model's shift_round / shift_round_saturate, in Amaranth's simulator (no Verilator build)."""
import numpy as np
from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.sim import Simulator

from pmkvq_accel.hw.arith import (reg, saturate, select_update, shift_amount, shift_round_by, shift_round_sat_by,
                                  shift_sat_ctl)
from pmkvq_accel.model.fixedpoint import shift_round, shift_round_saturate

XBITS, KBITS, KMAX, LMAX, LIMIT, NOUT = 49, 19, 48, 2, 62, 27


def _design():
    m = Module()
    x, k, d = Signal(signed(XBITS)), Signal(signed(KBITS)), Signal(signed(64))
    xr = reg(m, 1, x)
    xr3 = reg(m, 1, reg(m, 1, xr))           # shift_sat_ctl's fields come two stages after k - 1 and -k
    sa = shift_amount(m, 1, k + LMAX, KMAX + LMAX)
    rs = shift_round_by(m, xr, sa, LMAX)
    rs_low = shift_round_by(m, xr, sa, LMAX, NOUT)         # only the low NOUT bits built
    rss = shift_round_sat_by(m, 1, xr3, shift_sat_ctl(m, 1, reg(m, 1, k - 1), reg(m, 1, -k), KMAX, LIMIT, XBITS),
                             LIMIT)
    sat = saturate(m, d, 31)
    return m, (x, k, d), (rs, rs_low, rss, sat)


def _cases(rng, n):
    xs = [0, 1, -1, (1 << 45) - 1, -(1 << 45) + 1, 1 << 44, -(1 << 44)]
    ks = [0, 1, -1, -2, 47, 48, 60, -15, -16, -17, -62, -63, -200, 300]
    cases = [(x, k) for x in xs for k in ks]
    for _ in range(n):
        bits = int(rng.integers(0, 46))
        x = int(rng.integers(-(1 << bits) + 1, 1 << bits)) if bits else 0
        cases.append((x, int(rng.integers(-70, 60))))
    return cases


def test_split_shift_helpers_match_golden():
    rng = np.random.default_rng(3)
    cases = _cases(rng, 600)
    diffs = [0, 1, -1, (1 << 31) - 1, 1 << 31, -(1 << 31), -(1 << 31) + 1, (1 << 62) - 1, -(1 << 62)]
    diffs += [int(v) for v in rng.integers(-(1 << 62), 1 << 62, size=len(cases) - len(diffs))]
    m, (x, k, d), (rs, rs_low, rss, sat) = _design()
    sim = Simulator(m)
    sim.add_clock(1e-6)
    bad = []

    async def bench(ctx):
        for (xv, kv), dv in zip(cases, diffs):
            ctx.set(x, xv)
            ctx.set(k, kv)
            ctx.set(d, dv)
            await ctx.tick().repeat(4)       # inputs held: every pipeline depth has settled
            if kv >= -LMAX:
                want = int(shift_round(np.array([xv]), min(kv, KMAX))[0])
                if ctx.get(rs) != want:
                    bad.append(("rshr", xv, kv, ctx.get(rs), want))
                if ctx.get(rs_low) != want & ((1 << NOUT) - 1):
                    bad.append(("rshr low bits", xv, kv, ctx.get(rs_low), want))
            want = int(shift_round_saturate(np.array([xv]), kv, LIMIT)[0])
            if ctx.get(rss) != want:
                bad.append(("rshr_sat", xv, kv, ctx.get(rss), want))
            want = max(-(1 << 31) + 1, min((1 << 31) - 1, dv))
            if ctx.get(sat) != want:
                bad.append(("sat", dv, ctx.get(sat), want))

    sim.add_testbench(bench)
    sim.run()
    assert not bad, bad[:5]


def test_select_update_takes_the_event_value_or_holds():
    """arith.select_update (the controller's AND-OR register updates): with one event true the register
    takes that event's value, with none it holds; 7 cases cover a partial last group of three."""
    m = Module()
    evs = [Signal(name=f"ev{i}") for i in range(7)]
    vals = [Signal(unsigned(17), name=f"v{i}") for i in range(7)]
    target = Signal(unsigned(17), init=5)
    select_update(m, target, list(zip(evs, vals)))
    rng = np.random.default_rng(5)
    sim = Simulator(m)
    sim.add_clock(1e-6)
    bad = []

    async def bench(ctx):
        want = 5
        for _ in range(300):
            vs = [int(v) for v in rng.integers(0, 1 << 17, size=7)]
            hot = int(rng.integers(-3, 7))          # < 0: no event
            for i in range(7):
                ctx.set(vals[i], vs[i])
                ctx.set(evs[i], int(i == hot))
            await ctx.tick()
            want = vs[hot] if hot >= 0 else want
            if ctx.get(target) != want:
                bad.append((hot, ctx.get(target), want))

    sim.add_testbench(bench)
    sim.run()
    assert not bad, bad[:5]


def test_wide_accumulator_is_exact_to_its_bound():
    """hw/values.ValueMac._wide_acc (P's 48 bits and a count of their wraps) gives the exact run sum for sums that
    walk to +-(2^(bits-1) - 1) in beats of up to BEAT_SUM_BOUND, over runs started by `clear`; and acc_bits
    holds the worst run of a full-length job (max_tokens tokens of the largest |W c16 - Z| that the formats
    allow: W < 2^W_BITS, codes < 2^16, |Z| < 2^42)."""
    from pmkvq_accel.hw.config import DatapathConfig
    from pmkvq_accel.hw.dsp import P_BITS
    from pmkvq_accel.hw.values import BEAT_SUM_BOUND, ValueMac, acc_bits
    from pmkvq_accel.model.formats import W_BITS

    cfg = DatapathConfig()
    bits = acc_bits(cfg)
    worst = cfg.max_tokens * ((2 ** W_BITS - 1) * (2 ** 16 - 1) + 2 ** 42)
    assert worst < 2 ** (bits - 1)
    m = Module()
    p, en, clear = Signal(P_BITS), Signal(), Signal()
    acc = ValueMac._wide_acc(m, en, clear, p, bits, "t")
    rng = np.random.default_rng(5)
    top = 2 ** (bits - 1) - 1
    runs = []
    for target in (top, -top, top // 3):          # up to the bound, down to it, and a run that turns back
        sums, s = [], 0
        while abs(target - s) > 0:
            step = int(np.clip(target - s, -(BEAT_SUM_BOUND - 1), BEAT_SUM_BOUND - 1))
            if rng.random() < 0.3:                 # random beats in between, either sign
                step = int(rng.integers(-(BEAT_SUM_BOUND - 1), BEAT_SUM_BOUND))
            s = max(-top, min(top, s + step))
            sums.append(s)
        runs.append(sums)
    seen = []

    async def bench(ctx):
        for sums in runs:
            for i, s in enumerate(sums):
                ctx.set(p, s % 2 ** P_BITS)
                ctx.set(clear, i == 0)
                ctx.set(en, 1)
                await ctx.tick()
                got = ctx.get(acc)
                seen.append((got - 2 ** bits if got >> (bits - 1) else got, s))

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert len(seen) > 3000
    bad = [(g, s) for g, s in seen if g != s]
    assert not bad, f"{len(bad)} wrong sums, first {bad[0]}"
