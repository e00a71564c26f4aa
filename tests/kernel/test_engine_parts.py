"""The engine's parts (hw/kernel.py) in Amaranth's simulator, no Verilator build: the word sequencer hands
the datapath its words in the order docs/hardware.md specifies (written here from the rule), under random
stalls on every stream; the partial-record packer writes regmap.partial_dtype records."""
import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from pmkvq_accel.hw import regmap as R
from pmkvq_accel.hw.kernel import KernelConfig, PartialRecords, WordSequencer
from pmkvq_accel.model.formats import width_code

W, HD = 128, 64
MPW = W // 32
STREAMS = ("kmeta", "kcode", "vmeta", "vcode")


def expected_order(counts, k_bits, v_bits):
    """Stream names in consumption order: per segment, per group of MPW tokens a key-metadata word then the
    group's code words; then all value metadata; then all value codes."""
    out = []
    widths = (16, k_bits, 16)
    for n, bits in zip(counts, widths):
        for g in range(-(-n // MPW)):
            ntok = min(MPW, n - g * MPW)
            out += ["kmeta"] + ["kcode"] * -(-ntok * HD * bits // W)
    out += ["vmeta"] * sum(-(-n // MPW) for n in counts)
    out += ["vcode"] * sum(-(-n * HD * b // W) for n, b in zip(counts, (16, v_bits, 16)))
    return out


def run_sequencer(jobs, seed):
    dut = WordSequencer(W, HD)
    rng = random.Random(seed)
    got = []

    async def bench(ctx):
        for counts, k_bits, v_bits in jobs:
            want = expected_order(counts, k_bits, v_bits)
            ctx.set(dut.k_lb, width_code(k_bits))
            for i, c in enumerate(counts):
                ctx.set(dut.counts[i], c)
            ctx.set(dut.vmeta_words, want.count("vmeta"))
            ctx.set(dut.vcode_words, want.count("vcode"))
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            nxt = {s: 0 for s in STREAMS}
            seen = []
            for _ in range(20 * len(want) + 50):
                for s in STREAMS:   # every source offers its next word at random
                    port = getattr(dut, s)
                    ctx.set(port.valid, rng.random() < 0.7)
                    ctx.set(port.payload, (STREAMS.index(s) << 32) | nxt[s])
                ctx.set(dut.out.ready, rng.random() < 0.7)
                if ctx.get(dut.out.valid) and ctx.get(dut.out.ready):
                    word = ctx.get(dut.out.payload)
                    s, idx = STREAMS[word >> 32], word & 0xFFFFFFFF
                    assert idx == nxt[s], f"{s} word {idx} out of order"
                    seen.append(s)
                for s in STREAMS:
                    port = getattr(dut, s)
                    if ctx.get(port.valid) and ctx.get(port.ready):
                        nxt[s] += 1
                await ctx.tick()
                if ctx.get(dut.done) and len(seen) == len(want):
                    break
            assert seen == want
            assert ctx.get(dut.done)
            got.append(seen)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return got


def test_word_sequencer_order_under_stalls():
    rng = np.random.default_rng(0)
    jobs = [((1, 0, 1), 16, 16), ((0, 37, 0), 4, 16), ((1, 64, 17), 2, 8), ((0, 5, 3), 8, 2)]
    for _ in range(4):
        counts = tuple(int(x) for x in rng.integers(0, 40, size=3))
        if sum(counts):
            jobs.append((counts, int(rng.choice([2, 4, 8, 16])), int(rng.choice([2, 4, 8, 16]))))
    assert len(run_sequencer(jobs, seed=1)) == len(jobs)


def test_word_sequencer_oracle_can_fail():
    """The bench's own oracle differs from a wrong order (a swapped key width): the test above can fail."""
    assert expected_order((1, 8, 0), 4, 4) != expected_order((1, 8, 0), 8, 4)


@pytest.mark.parametrize("word_bits", [128, 512])
def test_partial_records_layout(word_bits):
    """Two jobs' result beats (every head's fields in each beat, as the datapath holds them) become the records
    of head 0, 1, 2 in order, each from its own head's lanes, under random stalls of the writer."""
    G = 3
    cfg = KernelConfig(word_bits=word_bits, head_dim=HD, groups=G, max_tokens=2048)
    dut = PartialRecords(cfg)
    rng = np.random.default_rng(word_bits)

    def job():
        return [dict(m=int(rng.integers(-2**31, 2**31)), l=int(rng.integers(0, 2**63)),
                     acc=rng.integers(-2**63, 2**63, size=HD, dtype=np.int64)) for _ in range(G)]

    jobs = [(job(), int(rng.integers(-300, 300))) for _ in range(2)]
    beats = []
    for heads, e in jobs:
        acc = 0
        for i, a in enumerate(a for x in heads for a in x["acc"]):
            acc |= (int(a) & (2**64 - 1)) << (64 * i)
        payload = {"m": sum((x["m"] & 0xFFFFFFFF) << (32 * g) for g, x in enumerate(heads)),
                   "l": sum(x["l"] << (64 * g) for g, x in enumerate(heads)), "e": e & 0xFFFF, "acc": acc}
        beats += [dict(payload, head=g) for g in range(G)]
    words = []

    async def bench(ctx):
        r = random.Random(2)
        pending = list(beats)
        for _ in range(800):
            if pending:
                ctx.set(dut.result.payload, pending[0])
                ctx.set(dut.result.valid, 1)
            else:
                ctx.set(dut.result.valid, 0)
            ctx.set(dut.words.ready, r.random() < 0.6)
            took = pending and ctx.get(dut.result.valid) and ctx.get(dut.result.ready)
            if ctx.get(dut.words.valid) and ctx.get(dut.words.ready):
                words.append(ctx.get(dut.words.payload))
            await ctx.tick()
            if took:
                pending.pop(0)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    raw = b"".join(w.to_bytes(word_bits // 8, "little") for w in words)
    recs = np.frombuffer(raw, R.partial_dtype(HD))
    want = [(x, e) for heads, e in jobs for x in heads]
    assert len(recs) == len(want)
    for rec, (x, e) in zip(recs, want):
        assert (int(rec["m"]), int(rec["E"]), int(rec["L"])) == (x["m"], e, x["l"])
        assert np.array_equal(rec["acc"], x["acc"])


@pytest.mark.parametrize("stages", [1, 2])
def test_slr_slice_passes_every_beat_in_order_at_full_rate(stages):
    """AxiSlice: AR (master -> port) and R (port -> master) under random valid/ready keep every beat, in
    order; with both sides always ready, one beat per cycle after `stages` cycles of latency."""
    from amaranth.hdl import Module
    from pmkvq_accel.hw.axi import AxiSlice, axi_full_bundle
    inner, outer = axi_full_bundle("inner", 128), axi_full_bundle("outer", 128)
    top = Module()
    top.submodules.s = AxiSlice(inner, outer, stages)
    sent, got_ar, got_r, r_cycles = list(range(1, 60)), [], [], []

    async def bench(ctx):
        rng = random.Random(stages)
        ar_i = r_i = 0
        for cycle in range(600):
            free = cycle >= 400            # last phase: no stalls, measure the rate
            ctx.set(inner.arvalid, ar_i < len(sent) and (free or rng.random() < 0.6))
            ctx.set(inner.araddr, sent[ar_i] if ar_i < len(sent) else 0)
            ctx.set(outer.arready, free or rng.random() < 0.6)
            ctx.set(outer.rvalid, r_i < len(sent) and (free or rng.random() < 0.6))
            ctx.set(outer.rdata, sent[r_i] if r_i < len(sent) else 0)
            ctx.set(inner.rready, free or rng.random() < 0.6)
            if ctx.get(outer.arvalid) and ctx.get(outer.arready):
                got_ar.append(ctx.get(outer.araddr))
            if ctx.get(inner.rvalid) and ctx.get(inner.rready):
                got_r.append(ctx.get(inner.rdata))
                r_cycles.append(cycle)
            if ctx.get(inner.arvalid) and ctx.get(inner.arready):
                ar_i += 1
            if ctx.get(outer.rvalid) and ctx.get(outer.rready):
                r_i += 1
            if cycle == 399:   # refill for the unstalled phase
                sent.extend(range(100, 140))
            await ctx.tick()

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert got_ar == sent and got_r == sent
    last = r_cycles[-40:]
    assert last[-1] - last[0] == 39          # no stalls: one beat per cycle through every stage
