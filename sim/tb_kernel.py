"""cocotb testbench of the whole kernel, acting as the host would: registers over an AXI4-Lite master,
HBM as AXI RAM models with random stalls on every channel, partial records compared with the golden model."""
import logging
import math
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam

from pmkvq_accel.hw import regmap as R
from pmkvq_accel.model.attention import quantize_query
from pmkvq_accel.model.quant import QuantizedKV, pack_codes, pack_metadata, quantize, shrink, shrink_to

from pmkvq_accel.sim.kernel_image import Head, build_image, decode_partials, expected_partials
from pmkvq_accel.sim.runner import tb_config

P = tb_config()
HD, G, ENGINES = P.get("head_dim", 64), P.get("groups", 3), P.get("engines", 1)


def stall(seed, p):
    rng = random.Random(seed)
    while True:
        yield rng.random() < p


class TB:
    def __init__(self, dut, mem_size=1 << 22, seed=0, stalls=0.0):
        self.dut = dut
        self.word_bits = len(dut.m_axi_gmem0_rdata)
        logging.getLogger(f"cocotb.{dut._name}").setLevel(logging.WARNING)  # the bus models log every transfer
        cocotb.start_soon(Clock(dut.ap_clk, 4, unit="ns").start())
        self.ctrl = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.ap_clk, dut.ap_rst_n,
                                  reset_active_level=False)

        self.rams = []
        for e in range(ENGINES):
            ram = AxiRam(AxiBus.from_prefix(dut, f"m_axi_gmem{e}"), dut.ap_clk, dut.ap_rst_n,
                         reset_active_level=False, size=mem_size)
            if stalls:
                for ch, s in ((ram.write_if.aw_channel, 1), (ram.write_if.w_channel, 2),
                              (ram.write_if.b_channel, 3), (ram.read_if.ar_channel, 4),
                              (ram.read_if.r_channel, 5)):
                    ch.set_pause_generator(stall(seed * 10 + s, stalls))
            self.rams.append(ram)

    async def reset(self):
        self.dut.ap_rst_n.value = 0
        await ClockCycles(self.dut.ap_clk, 5)
        self.dut.ap_rst_n.value = 1
        await ClockCycles(self.dut.ap_clk, 2)

    def load(self, mem):
        for ram in self.rams:
            for addr, data in mem.items():
                if data:
                    ram.write(addr, data)

    async def launch(self, args, timeout=2_000_000):
        for name, value in args.items():
            off, bits = R.ARGS[name]
            await self.ctrl.write_dword(off, value & 0xFFFFFFFF)
            if bits == 64:
                await self.ctrl.write_dword(off + 4, value >> 32)
        await self.ctrl.write_dword(R.CTRL, R.AP_START)
        start = cocotb.utils.get_sim_time("ns")
        for _ in range(timeout // 64):
            await ClockCycles(self.dut.ap_clk, 64)
            if await self.ctrl.read_dword(R.CTRL) & R.AP_DONE:
                cycles = (cocotb.utils.get_sim_time("ns") - start) / 4
                return await self.ctrl.read_dword(R.STATUS), cycles
        debug = await self.ctrl.read_dword(R.DEBUG)
        raise AssertionError(f"kernel did not finish (no ap_done); debug register {debug:#010x}")


def make_heads(rng, n_heads, n_sink, n_body, n_window, k_bits, v_bits, outliers=False):
    heads = []
    for _ in range(n_heads):
        T = n_sink + n_body + n_window
        k = rng.normal(size=(T, HD)) * 2
        if outliers:
            k[:, 3] *= 30
        v = rng.normal(size=(T, HD))

        def blocks(x, bits):
            sink = quantize(x[:n_sink], 16) if n_sink else None
            body = quantize(x[n_sink:n_sink + n_body], bits) if n_body else None
            window = quantize(x[n_sink + n_body:], 16) if n_window else None
            return (sink, body, window)
        q = quantize_query(rng.normal(size=(G, HD)), 1 / math.sqrt(HD))
        heads.append(Head(blocks(k, k_bits), blocks(v, v_bits), q))
    return heads


async def check_launch(tb, heads):
    mem, args, _ = build_image(heads)
    tb.load(mem)
    return await check_launch_args(tb, heads, args)


@cocotb.test()
async def run_attention(dut):
    rng = np.random.default_rng(P.get("seed", 0))
    tb = TB(dut, seed=P.get("seed", 0), stalls=P.get("stalls", 0.0))
    await tb.reset()
    for case in P["cases"]:
        heads = make_heads(rng, **case)
        await check_launch(tb, heads)


@cocotb.test()
async def run_bad_arguments(dut):
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(1)
    heads = make_heads(rng, 1, 1, 32, 8, 4, 4)
    mem, args, _ = build_image(heads)
    tb.load(mem)
    bad = [
        (dict(op=9), R.STATUS_BAD_OP),
        (dict(head_dim=HD * 2), R.STATUS_BAD_HEAD_DIM),
        (dict(group=G + 1), R.STATUS_BAD_GROUP),
        (dict(k_bits=3), R.STATUS_BAD_BITS),
        (dict(n_sink=0, n_body=0, n_window=0), R.STATUS_BAD_TOKENS),
        (dict(n_heads=0), R.STATUS_BAD_TOKENS),
        (dict(partial=args["partial"] + 4), R.STATUS_BAD_ADDRESS),
    ]
    for change, code in bad:
        status, _ = await tb.launch({**args, **change})
        assert status == code, (change, status)
    # and the kernel still works afterwards
    status, _ = await tb.launch(args)
    assert status == R.STATUS_OK


def region(ram, addr, nbytes):
    return bytes(ram.read(addr, nbytes))


def join(a, b):
    return QuantizedKV(np.concatenate([a.codes, b.codes]), np.concatenate([a.scale, b.scale]),
                       np.concatenate([a.zero, b.zero]), a.bits)


@cocotb.test()
async def run_shrink_copy_attention(dut):
    """SHRINK keys and values in place, flush the window into the body (SHRINK the window twice, COPY it),
    then ATTENTION over the result: every step checked against the golden model's integer shrink."""
    tb = TB(dut, seed=7, stalls=P.get("stalls", 0.0))
    await tb.reset()
    rng = np.random.default_rng(P.get("seed", 5))
    n_body, n_window = 64, 32
    heads = make_heads(rng, 2, 1, n_body, n_window, 8, 4, outliers=True)
    mem, args, _ = build_image(heads)
    tb.load(mem)
    ram = tb.rams[0]

    def codes_at(kind, h, off):
        base, stride = (args["k_codes"], args["k_codes_stride"]) if kind == 0 else (args["v_codes"], args["v_codes_stride"])
        return base + h * stride + off

    def meta_at(kind, h, off):
        return (args["k_meta"] if kind == 0 else args["v_meta"]) + h * args["meta_stride"] + off

    def check_block(kind, h, code_off, meta_off, block):
        packed = pack_codes(block.codes, block.bits, tb.word_bits).tobytes()
        assert region(ram, codes_at(kind, h, code_off), len(packed)) == packed
        meta = pack_metadata(block.scale, block.zero).astype("<u4").tobytes()
        assert region(ram, meta_at(kind, h, meta_off), len(meta)) == meta

    # 1. SHRINK the key body 8 -> 4 and the value body 4 -> 2
    for kind, bits in ((0, 8), (1, 4)):
        status, _ = await tb.launch({**args, "op": R.OP_SHRINK, "kind": kind,
                                     ("k_bits" if kind == 0 else "v_bits"): bits})
        assert status == R.STATUS_OK, R.STATUS_NAMES[status]
    for h, hd in enumerate(heads):
        hd.keys = (hd.keys[0], shrink(hd.keys[1]), hd.keys[2])
        hd.values = (hd.values[0], shrink(hd.values[1]), hd.values[2])
        check_block(0, h, args["k_body_off"], args["meta_body_off"], hd.keys[1])
        check_block(1, h, args["v_body_off"], args["meta_body_off"], hd.values[1])
    # 2. attention over the shrunk bodies
    args.update(k_bits=4, v_bits=2)
    await check_launch_args(tb, heads, args)
    # 3. flush the window into the body: SHRINK it 16 -> 8 -> 4 (keys) / 16 -> 8 -> 4 -> 2 (values), COPY
    body_bytes = {0: n_body * HD * 4 // 8, 1: n_body * HD * 2 // 8}
    for kind, target in ((0, 4), (1, 2)):
        off = "k" if kind == 0 else "v"
        bits = 16
        while bits > target:
            status, _ = await tb.launch({**args, "op": R.OP_SHRINK, "kind": kind, "n_body": n_window,
                                         f"{off}_bits": bits, f"{off}_body_off": args[f"{off}_window_off"],
                                         "meta_body_off": args["meta_window_off"]})
            assert status == R.STATUS_OK, R.STATUS_NAMES[status]
            bits //= 2
        status, _ = await tb.launch({**args, "op": R.OP_COPY, "kind": kind, f"{off}_bits": target,
                                     f"{off}_body_off": args[f"{off}_body_off"] + body_bytes[kind],
                                     "meta_body_off": args["meta_body_off"] + 4 * n_body})
        assert status == R.STATUS_OK, R.STATUS_NAMES[status]
    for h, hd in enumerate(heads):
        hd.keys = (hd.keys[0], join(hd.keys[1], shrink_to(hd.keys[2], 4)), None)
        hd.values = (hd.values[0], join(hd.values[1], shrink_to(hd.values[2], 2)), None)
        check_block(0, h, args["k_body_off"], args["meta_body_off"], hd.keys[1])
        check_block(1, h, args["v_body_off"], args["meta_body_off"], hd.values[1])
    # 4. attention over sink + the grown body, no window
    args.update(n_body=n_body + n_window, n_window=0)
    await check_launch_args(tb, heads, args)


async def check_launch_args(tb, heads, args):
    """Launch, then compare every head's partial records (in the RAM of the engine that owns the head)."""
    status, cycles = await tb.launch(args)
    assert status == R.STATUS_OK, R.STATUS_NAMES[status]
    want = expected_partials(heads)
    n = len(heads)
    for h in range(n):
        ram = tb.rams[h % ENGINES]
        got = decode_partials(ram.read(args["partial"], n * G * R.partial_record_bytes(HD)), n, G, HD)
        for g in range(G):
            m, E, L, acc = got[h][g]
            assert (m, E, L) == (int(want[h].m[g]), want[h].E, int(want[h].L[g])), f"head {h} g {g}"
            np.testing.assert_array_equal(acc, want[h].acc[g])
    return cycles



class LatencyMemory:
    """AXI4 slave with a fixed read latency (HBM-like: every burst's first beat comes `latency` cycles after
    its address, then one beat per cycle; any number of bursts in flight). Writes complete at once.
    Counts the cycles the R channel carried data, for the bandwidth measurement."""

    def __init__(self, dut, prefix, clk, size, latency):
        self.clk, self.latency = clk, latency
        self.mem = bytearray(size)
        self.s = {n: getattr(dut, f"{prefix}_{n}") for n in (
            "arvalid", "arready", "araddr", "arlen", "rvalid", "rready", "rdata", "rlast", "rresp", "rid",
            "awvalid", "awready", "awaddr", "awlen", "wvalid", "wready", "wdata", "wlast", "bvalid", "bready",
            "bresp", "bid")}
        self.wbytes = len(self.s["rdata"]) // 8
        self.beats = 0
        self.beat_cycles = []
        self.ar_log = []
        cocotb.start_soon(self._read())
        cocotb.start_soon(self._write())

    def write(self, addr, data):
        self.mem[addr:addr + len(data)] = data

    def read(self, addr, n):
        return bytes(self.mem[addr:addr + n])

    async def _read(self):
        s, queue, cycle = self.s, [], 0
        s["arready"].value = 1
        s["rvalid"].value = 0
        s["rresp"].value = 0
        s["rid"].value = 0
        beat = None
        while True:
            await RisingEdge(self.clk)
            cycle += 1
            self.cycle = cycle
            if s["rvalid"].value and s["rready"].value:
                self.beats += 1
                self.beat_cycles.append(cycle)
                beat = None
            if s["arvalid"].value and s["arready"].value:
                queue.append([cycle + self.latency, int(s["araddr"].value), int(s["arlen"].value) + 1])
                self.ar_log.append((cycle, int(s["araddr"].value), int(s["arlen"].value) + 1))
            if beat is None and queue and queue[0][0] <= cycle:
                q = queue[0]
                beat = q[1]
                q[1] += self.wbytes
                q[2] -= 1
                last = q[2] == 0
                if last:
                    queue.pop(0)
                s["rdata"].value = int.from_bytes(self.mem[beat:beat + self.wbytes], "little")
                s["rlast"].value = int(last)
                s["rvalid"].value = 1
            elif beat is None:
                s["rvalid"].value = 0

    async def _write(self):
        s = self.s
        s["awready"].value = 1
        s["wready"].value = 1
        s["bvalid"].value = 0
        s["bresp"].value = 0
        s["bid"].value = 0
        bursts, pending_b = [], 0
        while True:
            await RisingEdge(self.clk)
            if s["bvalid"].value and s["bready"].value:
                pending_b -= 1
            if s["awvalid"].value and s["awready"].value:
                bursts.append(int(s["awaddr"].value))
            if s["wvalid"].value and s["wready"].value:
                addr = bursts[0]
                self.mem[addr:addr + self.wbytes] = int(s["wdata"].value).to_bytes(self.wbytes, "little")
                bursts[0] += self.wbytes
                if s["wlast"].value:
                    bursts.pop(0)
                    pending_b += 1
            s["bvalid"].value = int(pending_b > 0)


@cocotb.test()
async def run_bandwidth(dut):
    """Cycles of one ATTENTION launch against the words it reads, with a fixed-latency memory."""
    cocotb.start_soon(Clock(dut.ap_clk, 4, unit="ns").start())
    ctrl = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.ap_clk, dut.ap_rst_n,
                         reset_active_level=False)
    logging.getLogger(f"cocotb.{dut._name}").setLevel(logging.WARNING)
    mem = LatencyMemory(dut, "m_axi_gmem0", dut.ap_clk, 1 << 24, P.get("latency", 100))
    dut.ap_rst_n.value = 0
    await ClockCycles(dut.ap_clk, 5)
    dut.ap_rst_n.value = 1
    await ClockCycles(dut.ap_clk, 2)
    rng = np.random.default_rng(0)
    rows = []
    for case in P["cases"]:
        heads = make_heads(rng, **case)
        image, args, _ = build_image(heads, body_cap=max(2048, case["n_body"]))
        for addr, data in image.items():
            mem.write(addr, data)
        for name, value in args.items():
            off, bits = R.ARGS[name]
            await ctrl.write_dword(off, value & 0xFFFFFFFF)
            if bits == 64:
                await ctrl.write_dword(off + 4, value >> 32)
        mem.beats = 0
        mem.beat_cycles = []
        mem.ar_log = []
        start = cocotb.utils.get_sim_time("ns")
        await ctrl.write_dword(R.CTRL, R.AP_START)
        start_cycle = mem.cycle
        trace, last = [], None
        while not int(dut.interrupt.value) and not (await ctrl.read_dword(R.CTRL)) & R.AP_DONE:
            if P.get("trace"):
                d = await ctrl.read_dword(R.DEBUG)
                if d != last:
                    trace.append((mem.cycle, hex(d)))
                    last = d
            else:
                await ClockCycles(dut.ap_clk, 16)
        cycles = (cocotb.utils.get_sim_time("ns") - start) / 4
        done_cycle = mem.cycle
        status = await ctrl.read_dword(R.STATUS)
        assert status == R.STATUS_OK, R.STATUS_NAMES[status]
        want = expected_partials(heads)
        got = decode_partials(mem.read(args["partial"], len(heads) * G * R.partial_record_bytes(HD)),
                              len(heads), G, HD)
        for h in range(len(heads)):
            for g in range(G):
                assert got[h][g][2] == int(want[h].L[g])
        bc = mem.beat_cycles
        gaps = [b - a - 1 for a, b in zip(bc, bc[1:]) if b - a > 1]
        rows.append(dict(case, cycles=cycles, words=mem.beats, r_span=bc[-1] - bc[0] + 1 if bc else 0,
                         r_gaps=len(gaps), r_gap_cycles=sum(gaps), ar=mem.ar_log[:60],
                         timeline=[start_cycle, mem.ar_log[0][0], bc[0], bc[-1], done_cycle], trace=trace))
    with open(P["out"], "w") as f:
        import json
        json.dump(rows, f)
