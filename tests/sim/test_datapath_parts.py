"""The datapath's parts (hw/control.py, hw/buffers.py, hw/runstats.py, arith.DelayLine) in Amaranth's
simulator, no Verilator build. Each is checked against a rule written here from docs/hardware.md and
docs/numerics.md (not from the RTL), under random stalls; the whole datapath's bit-exact test is
tests/sim/test_datapath.py."""
import random

import numpy as np
import pytest
from amaranth.hdl import unsigned
from amaranth.lib import data
from amaranth.sim import Simulator

from pmkvq_accel.hw.arith import DelayLine
from pmkvq_accel.hw.buffers import MetaBuffer, ScoreBuffer
from pmkvq_accel.hw.config import DatapathConfig
from pmkvq_accel.hw.control import COUNT_BITS, JobController, job_layout
from pmkvq_accel.hw.jobs import as_signed, lane, lanes, pack_fields
from pmkvq_accel.hw.runstats import E_EMPTY, M_EMPTY, RunSums, ScoreMax, ValueExponent
from pmkvq_accel.hw.softmax import P_BITS, Z_OUT
from pmkvq_accel.model.fixedpoint import bf16_fields
from pmkvq_accel.model.formats import width_code


async def pulse(ctx, signal):
    """`signal` high for one cycle."""
    ctx.set(signal, 1)
    await ctx.tick()
    ctx.set(signal, 0)


def simulate(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


# ---- controller ---------------------------------------------------------------------------------

def code_words(cfg, bits, n):
    """(gl, ntok, wi, first, last) of each code word of a group of n tokens: tokens per word W / (hd b) when
    that is >= 1, else every token spans hd b / W words."""
    W, HD = cfg.word_bits, cfg.head_dim
    tpw, wpt = W // (HD * bits), HD * bits // W
    if tpw:
        return [(gl, min(tpw, n - gl), 0, 1, 1) for gl in range(0, n, tpw)]
    return [(t, 1, wi, int(wi == 0), int(wi == wpt - 1)) for t in range(n) for wi in range(wpt)]


def value_beats(cfg, bits, n):
    """(gl, ntok, wi, first, last, half, took) of each value beat of a group of n tokens: a word of more than
    max(1, nj / 2) tokens (the value pass's slots) is two beats, the lower tokens then the upper ones, and
    the word is taken with its last beat; a word whose tokens fit the slots is one beat."""
    slots = max(1, cfg.word_bits // (2 * cfg.head_dim) // 2)
    beats = []
    for gl, ntok, wi, first, last in code_words(cfg, bits, n):
        parts = [(gl + h * slots, min(slots, ntok - h * slots), h) for h in range(-(-ntok // slots))] \
            if ntok > slots else [(gl, ntok, 0)]
        beats += [(g, t, wi, first, last, h, int(i == len(parts) - 1)) for i, (g, t, h) in enumerate(parts)]
    return beats


def expected_events(cfg, segs):
    """What the controller says about each word of a job (hw/attention.py's word order): the S_Q beat; per
    segment and group of mpw tokens a key-metadata word, then the key words; the value-metadata words; the
    value words (the first clears the accumulators, the last ends the pass); entries count groups."""
    MPW = cfg.mpw
    groups = [(n, kb, vb, g, min(MPW, n - g * MPW)) for n, kb, vb in segs for g in range(-(-n // MPW))]
    ev = [("sq",)]
    for entry, (n, kb, vb, g, ntk) in enumerate(groups):
        ev.append(("kmeta",))
        ev += [("key", entry, *w, width_code(kb)) for w in code_words(cfg, kb, ntk)]
    ev += [("meta", entry, n - g * MPW, width_code(vb)) for entry, (n, kb, vb, g, ntk) in enumerate(groups)]
    vals = [("value", entry, *w, width_code(vb)) for entry, (n, kb, vb, g, ntk) in enumerate(groups)
            for w in value_beats(cfg, vb, ntk)]
    ev += [v + (int(i == 0), int(i == len(vals) - 1)) for i, v in enumerate(vals)]
    return ev + [("result", g) for g in range(cfg.groups)]


def run_controller(cfg, jobs, seed):
    dut = JobController(cfg)
    rng = random.Random(seed)
    NS, MPW, NJ = cfg.max_segments, cfg.mpw, cfg.nj

    async def bench(ctx):
        for segs in jobs:
            want = expected_events(cfg, segs)
            pad = [(0, 2, 2)] * (NS - len(segs))
            q, qexp = rng.getrandbits(len(dut.q)), rng.getrandbits(len(dut.qexp))
            ctx.set(dut.job.payload.as_value(), pack_fields(
                job_layout(cfg), q=q, qexp=qexp, nseg=len(segs),
                count=lanes([s[0] for s in segs + pad], COUNT_BITS),
                klb=lanes([width_code(s[1]) for s in segs + pad], 2),
                vlb=lanes([width_code(s[2]) for s in segs + pad], 2)))
            ctx.set(dut.job.valid, 1)
            while not ctx.get(dut.job.ready):
                await ctx.tick()
            assert ctx.get(dut.start)
            await ctx.tick()
            ctx.set(dut.job.valid, 0)
            assert (ctx.get(dut.q), ctx.get(dut.qexp)) == (q, qexp)
            got, kword = [], None
            for _ in range(8 * len(want) + 50):
                word = rng.getrandbits(cfg.word_bits)
                ctx.set(dut.word, word)
                ctx.set(dut.word_valid, rng.random() < 0.7)
                ctx.set(dut.v_go, rng.random() < 0.8)
                ctx.set(dut.mac_valid, rng.random() < 0.5)
                ctx.set(dut.result_ready, rng.random() < 0.7)
                took = ctx.get(dut.word_valid) and ctx.get(dut.word_ready)
                fields = tuple(ctx.get(getattr(dut, f)) for f in ("entry", "gl", "ntok", "wi", "w_first",
                                                                 "w_last", "lb"))
                if ctx.get(dut.key_valid) and ctx.get(dut.sq):
                    assert not took
                    got.append(("sq",))
                elif ctx.get(dut.key_valid):
                    assert took
                    got.append(("key", *fields))
                    gl, ntok = fields[1], fields[2]
                    for j in range(min(NJ, MPW - gl)):      # the key-metadata lanes of the word's tokens
                        assert lane(ctx.get(dut.kmeta), j, 32) == lane(kword, gl + j, 32)
                elif ctx.get(dut.meta_valid):
                    assert took
                    got.append(("meta", ctx.get(dut.entry), ctx.get(dut.rem), ctx.get(dut.seg_vlb)))
                elif ctx.get(dut.value_valid):
                    assert ctx.get(dut.v_go)
                    got.append(("value", *fields[:6], ctx.get(dut.half), int(took), fields[6],
                                ctx.get(dut.value_clear), ctx.get(dut.value_last)))
                elif took:
                    got.append(("kmeta",))
                    kword = word
                if ctx.get(dut.result_valid) and ctx.get(dut.result_ready):
                    assert ctx.get(dut.mac_valid)
                    got.append(("result", ctx.get(dut.head)))
                    assert ctx.get(dut.mac_ready) == (ctx.get(dut.head) == cfg.groups - 1)
                else:
                    assert not ctx.get(dut.mac_ready)
                await ctx.tick()
                if len(got) == len(want):
                    break
            ctx.set(dut.word_valid, 0)
            assert got == want
            assert ctx.get(dut.job.ready), "back in IDLE after the last result"

    simulate(dut, bench)


def random_jobs(cfg, rng, n):
    MPW = cfg.mpw
    counts = [1, MPW - 1, MPW, MPW + 1, 2 * MPW, 3 * MPW + 1, 4 * MPW + 3]
    jobs = []
    for _ in range(n):
        segs = [(rng.choice(counts + [rng.randint(1, 5 * MPW)]), rng.choice((2, 4, 8, 16)),
                 rng.choice((2, 4, 8, 16))) for _ in range(rng.randint(1, cfg.max_segments))]
        jobs.append(segs)
    return jobs


@pytest.mark.parametrize("dp", [dict(word_bits=512, head_dim=64, groups=3),      # 1..4 tokens per word
                                dict(word_bits=128, head_dim=64, groups=2),      # 1 token per word, or 2 words
                                dict(word_bits=64, head_dim=128, groups=1)])     # every token spans words
def test_controller_says_what_each_word_is(dp):
    cfg = DatapathConfig(**dp, max_tokens=2048)
    rng = random.Random(11)
    run_controller(cfg, random_jobs(cfg, rng, 6), seed=12)


def test_controller_oracle_can_fail():
    cfg = DatapathConfig(word_bits=512, head_dim=64, groups=3, max_tokens=2048)
    ev = expected_events(cfg, [(20, 2, 4)])
    assert ev.count(("kmeta",)) == 2 and sum(e[0] == "meta" for e in ev) == 2
    assert [e[2:4] for e in ev if e[0] == "key"] == [(0, 4), (4, 4), (8, 4), (12, 4), (0, 4)]
    assert [e[2:4] for e in ev if e[0] == "value"][-2:] == [(0, 2), (2, 2)]
    ev = expected_events(cfg, [(7, 4, 2)])          # 2-bit values: 4 + 3 tokens in two words, two beats each
    assert [(e[2], e[3], e[7], e[8]) for e in ev if e[0] == "value"] == [(0, 2, 0, 0), (2, 2, 1, 1),
                                                                        (4, 2, 0, 0), (6, 1, 1, 1)]
    ev = expected_events(cfg, [(6, 4, 2)])          # the second word's 2 tokens fit one beat
    assert [(e[2], e[3], e[7], e[8]) for e in ev if e[0] == "value"][-1] == (4, 2, 0, 1)


# ---- buffers ------------------------------------------------------------------------------------

CFG = DatapathConfig(word_bits=512, head_dim=64, groups=3, max_tokens=256)


def test_score_buffer_writes_the_word_tokens_lanes_and_reads_from_gl():
    cfg, rng = CFG, random.Random(3)
    dut = ScoreBuffer(cfg)
    MPW, NJ, G = cfg.mpw, cfg.nj, cfg.groups
    mem = {}

    async def bench(ctx):
        for _ in range(300):
            bits = rng.choice((2, 4, 8, 16))
            tpw = cfg.word_bits // (cfg.head_dim * bits)
            gl = rng.randrange(0, MPW, tpw) if tpw else rng.randrange(MPW)
            ntok = rng.randint(1, min(tpw, MPW - gl)) if tpw else 1
            entry, sc = rng.randrange(cfg.entries), rng.getrandbits(NJ * G * 32)
            valid = rng.random() < 0.7
            for name, v in (("valid", valid), ("score", sc), ("ntok", ntok), ("gl", gl), ("lb", width_code(bits)),
                            ("waddr", entry)):
                ctx.set(getattr(dut, name), v)
            await ctx.tick()
            if valid:
                for j in range(ntok):    # token j of the word sits in the score unit's lane j
                    mem[entry, gl + j] = lane(sc, j, G * 32)
        ctx.set(dut.valid, 0)
        for entry in range(cfg.entries):
            rgl = rng.randrange(MPW)
            ctx.set(dut.raddr, entry)
            await ctx.tick()
            ctx.set(dut.rgl, rgl)
            out = ctx.get(dut.lanes)
            for j in range(min(cfg.value_slots, MPW - rgl)):     # a value beat's lanes
                if (entry, rgl + j) in mem:
                    assert lane(out, j, G * 32) == mem[entry, rgl + j], (entry, rgl, j)
        assert len(mem) > 100

    simulate(dut, bench)


def test_meta_buffer_stores_words_and_reads_lanes():
    cfg, rng = CFG, random.Random(4)
    dut = MetaBuffer(cfg)
    words = {}

    async def bench(ctx):
        for _ in range(100):
            e, w, we = rng.randrange(cfg.entries), rng.getrandbits(cfg.word_bits), rng.random() < 0.6
            ctx.set(dut.waddr, e)
            ctx.set(dut.wdata, w)
            ctx.set(dut.we, we)
            await ctx.tick()
            if we:
                words[e] = w
        ctx.set(dut.we, 0)
        for e, w in words.items():
            rgl = rng.randrange(cfg.mpw)
            ctx.set(dut.raddr, e)
            await ctx.tick()
            ctx.set(dut.rgl, rgl)
            for j in range(min(cfg.value_slots, cfg.mpw - rgl)):
                assert lane(ctx.get(dut.lanes), j, 32) == lane(w, rgl + j, 32)

    simulate(dut, bench)


# ---- run statistics -----------------------------------------------------------------------------

def test_score_max_folds_valid_lanes_and_pending_covers_the_latency():
    cfg, rng = CFG, random.Random(5)
    dut = ScoreMax(cfg)
    NJ, G = cfg.nj, cfg.groups

    async def bench(ctx):
        model = [M_EMPTY] * G
        await pulse(ctx, dut.clear)
        checked = 0
        for cyc in range(400):
            if ctx.get(dut.pending) == 0:   # no word in the last two cycles: M holds every earlier word
                assert [as_signed(lane(ctx.get(dut.m), g, 32), 32) for g in range(G)] == model
                checked += 1
            valid = rng.random() < (0.6 if cyc % 80 < 40 else 0.1)
            ntok = rng.randint(1, NJ)
            scores = [[rng.choice((rng.randint(-2**31, 2**31 - 1), rng.randint(-100, 100))) for g in range(G)]
                      for j in range(NJ)]
            ctx.set(dut.valid, valid)
            ctx.set(dut.ntok, ntok)
            ctx.set(dut.score, lanes([scores[j][g] for j in range(NJ) for g in range(G)], 32))
            if valid:
                model = [max([model[g]] + [scores[j][g] for j in range(ntok)]) for g in range(G)]
            await ctx.tick()
        assert checked > 50

    simulate(dut, bench)


def e_terms(cfg, word, bits, rem):
    """numerics.md 7: the terms of the word's contribution to E: xs + b and xz of its lanes t < rem."""
    out = {"scale": [], "zero": []}
    for t in range(min(cfg.mpw, rem)):
        meta = lane(word, t, 32)
        _, xs = bf16_fields(np.array([meta & 0xFFFF], np.uint16))
        _, xz = bf16_fields(np.array([meta >> 16], np.uint16))
        out["scale"].append(int(xs[0]) + bits)
        out["zero"].append(int(xz[0]))
    return out


def e_of_word(cfg, word, bits, rem):
    """The word's contribution to E: the largest term."""
    return max(max(v) for v in e_terms(cfg, word, bits, rem).values())


def e_term(cfg, word, bits, rem):
    """Which term sets it ("zero" on a tie: a mutant that lowers xz shows there)."""
    terms = e_terms(cfg, word, bits, rem)
    return "zero" if max(terms["zero"]) >= max(terms["scale"]) else "scale"


def bf16_pattern(rng, exponents=range(255)):
    """A bf16 pattern with its exponent field drawn from `exponents` (255, Inf/NaN, never reaches the device)."""
    return rng.getrandbits(1) << 15 | rng.choice(exponents) << 7 | rng.getrandbits(7)


def test_value_exponent_is_the_max_over_lanes_in_the_segment():
    cfg, rng = CFG, random.Random(6)
    dut = ValueExponent(cfg, rem_bits=COUNT_BITS)

    async def bench(ctx):
        won = {"scale": 0, "zero": 0}
        for job in range(12):
            await pulse(ctx, dut.clear)
            model = E_EMPTY
            # scales and zeros of random size, or zeros far larger than the scales (E from xz)
            s_exp, z_exp = (range(255), range(255)) if job % 2 else (range(100, 110), range(105, 125))
            for _ in range(12):
                bits = rng.choice((2, 4, 8, 16))
                rem = rng.choice((1, 3, cfg.mpw - 1, cfg.mpw, cfg.mpw + 1, 1000, 1 << 16))
                word = lanes([bf16_pattern(rng, s_exp) | bf16_pattern(rng, z_exp) << 16 for _ in range(cfg.mpw)], 32)
                valid = rng.random() < 0.7
                for name, v in (("valid", valid), ("word", word), ("vlb", width_code(bits)), ("rem", rem)):
                    ctx.set(getattr(dut, name), v)
                await ctx.tick()
                if valid and e_of_word(cfg, word, bits, rem) > model:
                    model = e_of_word(cfg, word, bits, rem)
                    won[e_term(cfg, word, bits, rem)] += 1
                if rng.random() < 0.3:     # an idle gap of the unit's latency: E is final
                    ctx.set(dut.valid, 0)
                    await ctx.tick().repeat(dut.latency - 1)
                    assert ctx.get(dut.e) == model
            ctx.set(dut.valid, 0)
            await ctx.tick().repeat(dut.latency - 1)
            assert ctx.get(dut.e) == model
        assert min(won.values()) >= 10, won     # both terms set E many times

    simulate(dut, bench)


def test_run_sums_count_first_words_of_the_word_tokens():
    cfg, rng = CFG, random.Random(7)
    dut = RunSums(cfg)
    NJ, G = cfg.value_slots, cfg.groups

    async def bench(ctx):
        await pulse(ctx, dut.clear)
        L = [0] * G
        for _ in range(200):
            valid, first, ntok = rng.random() < 0.8, rng.random() < 0.7, rng.randint(1, NJ)
            p = [rng.choice((0, 1 << 32, rng.getrandbits(32))) for _ in range(NJ * G)]
            z = [rng.randint(-(1 << 42) + 1, (1 << 42) - 1) for _ in range(NJ * G)]
            for name, v in (("valid", valid), ("first", first), ("ntok", ntok), ("p", lanes(p, P_BITS)),
                            ("z_in", lanes(z, Z_OUT))):
                ctx.set(getattr(dut, name), v)
            counted = valid and first
            for j in range(NJ):
                for g in range(G):
                    want = z[j * G + g] if counted and j < ntok else 0
                    assert as_signed(lane(ctx.get(dut.z), j * G + g, Z_OUT), Z_OUT) == want
            if counted:
                L = [L[g] + sum(p[j * G + g] for j in range(ntok)) for g in range(G)]
            await ctx.tick()
        ctx.set(dut.valid, 0)
        await ctx.tick().repeat(2)
        assert [lane(ctx.get(dut.l), g, 64) for g in range(G)] == L

    simulate(dut, bench)


@pytest.mark.parametrize("stages", [1, 5])
def test_delay_line_delays_valid_and_payload(stages):
    rng = random.Random(stages)
    layout = data.StructLayout({"a": unsigned(7), "b": unsigned(40)})
    dut = DelayLine(layout, stages)
    sent = []

    async def bench(ctx):
        for cyc in range(100):
            v, a, b = rng.random() < 0.5, rng.getrandbits(7), rng.getrandbits(40)
            ctx.set(dut.i.valid, v)
            ctx.set(dut.i.payload.a, a)
            ctx.set(dut.i.payload.b, b)
            sent.append((v, a, b))
            if cyc >= stages:
                want = sent[cyc - stages]
                assert ctx.get(dut.o.valid) == want[0]
                if want[0]:
                    assert (ctx.get(dut.o.payload.a), ctx.get(dut.o.payload.b)) == want[1:]
            await ctx.tick()

    simulate(dut, bench)
