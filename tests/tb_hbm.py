"""cocotb bench of sim/hbm.py's HbmRam on the whole kernel: one ATTENTION launch with the engine's memory an
HbmRam (PC rate, latency, cross penalty, optional random R stalls), partial records compared with the golden
model, the R channel's beats written to `out` (JSON) for tests/test_hbm_model.py to check the rate."""
import json
import math

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles
from cocotbext.axi import AxiLiteBus, AxiLiteMaster

from pmkvq_accel.hw import regmap as R
from pmkvq_accel.model.attention import quantize_query
from pmkvq_accel.model.quant import quantize
from pmkvq_accel.sim.bench_card import launch_image
from pmkvq_accel.sim.hbm import HbmModel, HbmRam, PcBudget
from pmkvq_accel.sim.kernel_image import Head, decode_partials, expected_partials
from pmkvq_accel.sim.runner import tb_config

P = tb_config()


@cocotb.test()
async def run_hbm_ram(dut):
    import logging
    logging.getLogger(f"cocotb.{dut._name}").setLevel(logging.WARNING)
    hd, G, n_body = P.get("head_dim", 64), P.get("groups", 3), P.get("n_body", 256)
    model = HbmModel(**P.get("model", {}))
    cocotb.start_soon(Clock(dut.ap_clk, 4, unit="ns").start())
    ctrl = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.ap_clk, dut.ap_rst_n,
                         reset_active_level=False)
    pc, engines = P.get("pc", 0), P.get("engines", 1)
    budget = PcBudget(model)
    # engine 0's RAM: its data in PC `pc`; every other engine's (empty slice) in its own PC e
    rams = [HbmRam(dut, f"m_axi_gmem{e}", dut.ap_clk, dut.ap_rst_n, 1 << 22, model,
                   pc_of=(lambda a: pc) if e == 0 else (lambda a, e=e: e), home_pcs=(e,), budget=budget,
                   stall_r=P.get("stall_r", 0.0) if e == 0 else 0.0, seed=1 + e) for e in range(engines)]
    ram = rams[0]
    dut.ap_rst_n.value = 0
    await ClockCycles(dut.ap_clk, 5)
    dut.ap_rst_n.value = 1
    await ClockCycles(dut.ap_clk, 2)

    rng = np.random.default_rng(0)

    def blocks(b):
        return (None, quantize(rng.normal(size=(n_body, hd)).astype(np.float32), b), None)
    heads = [Head(blocks(16), blocks(16), quantize_query(rng.normal(size=(G, hd)), 1 / math.sqrt(hd)))]
    bufs, mem, regs = launch_image(heads, 0, n_body, 0, engines=engines)
    for addr, data in mem.items():
        if data:
            e = next(e for a, n, e, _ in bufs if a <= addr < a + n)
            rams[e].write(addr, data)
    for off, bits, value in regs:
        await ctrl.write_dword(off, value & 0xFFFFFFFF)
        if bits == 64:
            await ctrl.write_dword(off + 4, value >> 32)
    await ctrl.write_dword(R.CTRL, R.AP_START)
    start = ram.cycle
    for _ in range(20_000):
        await ClockCycles(dut.ap_clk, 64)
        if await ctrl.read_dword(R.CTRL) & R.AP_DONE:
            break
    else:
        raise AssertionError("no ap_done")
    assert await ctrl.read_dword(R.STATUS) == R.STATUS_OK
    named = {off: v for off, _, v in regs}
    args = R.all_args(engines)
    partial = named[args[R.engine_arg(0, "records")][0]] + named[args["partial"][0]]
    got = decode_partials(ram.read(partial, G * R.partial_record_bytes(hd)), 1, G, hd)
    want = expected_partials(heads)
    for g in range(G):
        m, E, L, acc = got[0][g]
        assert (m, E, L) == (int(want[0].m[g]), want[0].E, int(want[0].L[g])), f"g {g}"
        np.testing.assert_array_equal(acc, want[0].acc[g])
    assert ram.faults == 0
    with open(P["out"], "w") as f:
        json.dump({"beats": ram.r_beats, "first": ram.r_first - start, "last": ram.r_last - start,
                   "word_bytes": ram.wbytes}, f)
