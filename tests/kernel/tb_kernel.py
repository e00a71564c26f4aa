"""cocotb testbench of the whole kernel, acting as the host would: registers over an AXI4-Lite master,
HBM as AXI RAM models with random stalls on every channel, partial records compared with the golden model."""
import logging
import math
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles
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
    """The host's side of the bench: AXI4-Lite master, one AXI RAM per engine port (holding only that
    engine's buffer, so a read of another engine's memory returns zeros and fails the comparison), random
    stalls on all five AXI channels of every port."""

    def __init__(self, dut, mem_size=1 << 23, seed=0, stalls=0.0):
        self.dut = dut
        self.word_bits = len(dut.m_axi_gmem0_rdata)
        logging.getLogger(f"cocotb.{dut._name}").setLevel(logging.WARNING)  # the bus models log every transfer
        cocotb.start_soon(Clock(dut.ap_clk, 4, unit="ns").start())
        self.ctrl = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.ap_clk, dut.ap_rst_n,
                                  reset_active_level=False)
        self.regs = R.all_args(ENGINES)
        self.rams = []
        for e in range(ENGINES):
            ram = AxiRam(AxiBus.from_prefix(dut, f"m_axi_gmem{e}"), dut.ap_clk, dut.ap_rst_n,
                         reset_active_level=False, size=mem_size)
            if stalls:
                for ch, s in ((ram.write_if.aw_channel, 1), (ram.write_if.w_channel, 2),
                              (ram.write_if.b_channel, 3), (ram.read_if.ar_channel, 4),
                              (ram.read_if.r_channel, 5)):
                    ch.set_pause_generator(stall(seed * 10 + 6 * e + s, stalls))
            self.rams.append(ram)

    async def reset(self):
        self.dut.ap_rst_n.value = 0
        await ClockCycles(self.dut.ap_clk, 5)
        self.dut.ap_rst_n.value = 1
        await ClockCycles(self.dut.ap_clk, 2)
        assert await self.ctrl.read_dword(R.ENGINES) == ENGINES

    def load(self, image):
        for e, ram in enumerate(self.rams):
            for addr, nbytes in image.buffers(e):    # clear the buffers (partials from before)
                ram.write(addr, bytes(nbytes))
            for addr, data in image.engine_mem(e).items():
                if data:
                    ram.write(addr, data)

    async def launch(self, args, timeout=2_000_000):
        await write_args(self.ctrl, self.regs, args)
        await self.ctrl.write_dword(R.CTRL, R.AP_START)
        start = cocotb.utils.get_sim_time("ns")
        for _ in range(timeout // 64):
            await ClockCycles(self.dut.ap_clk, 64)
            if await self.ctrl.read_dword(R.CTRL) & R.AP_DONE:
                cycles = (cocotb.utils.get_sim_time("ns") - start) / 4
                return await self.ctrl.read_dword(R.STATUS), cycles
        debug = await self.ctrl.read_dword(R.DEBUG)
        raise AssertionError(f"kernel did not finish (no ap_done); debug register {debug:#010x}")


async def write_args(ctrl, regs, args):
    for name, value in args.items():
        off, bits = regs[name]
        await ctrl.write_dword(off, value & 0xFFFFFFFF)
        if bits == 64:
            await ctrl.write_dword(off + 4, value >> 32)


def make_heads(rng, n_heads, k_bits, v_bits, slices=None, n_sink=0, n_body=0, n_window=0, outliers=False):
    """engines x n_heads Heads: engine e holds slices[e] = (n_sink, n_body, n_window) tokens of every head
    (default: engine 0 holds (n_sink, n_body, n_window), the others nothing); one query per head for all."""
    slices = slices or [(n_sink, n_body, n_window)] + [(0, 0, 0)] * (ENGINES - 1)
    if len(slices) != ENGINES:
        raise ValueError(f"{len(slices)} slices for {ENGINES} engines")
    queries = [quantize_query(rng.normal(size=(G, HD)), 1 / math.sqrt(HD)) for _ in range(n_heads)]
    out = []
    for ns, nb, nw in slices:
        heads = []
        for h in range(n_heads):
            T = ns + nb + nw
            k = rng.normal(size=(T, HD)) * 2
            if outliers:
                k[:, 3] *= 30
            v = rng.normal(size=(T, HD))

            def blocks(x, bits):
                return (quantize(x[:ns], 16) if ns else None, quantize(x[ns:ns + nb], bits) if nb else None,
                        quantize(x[ns + nb:], 16) if nw else None)
            heads.append(Head(blocks(k, k_bits), blocks(v, v_bits), queries[h]))
        out.append(heads)
    return out


async def check_launch(tb, engines, body_cap=2048):
    image = build_image(engines, body_cap=body_cap)
    tb.load(image)
    return await check_launch_args(tb, engines, image, image.args)


@cocotb.test()
async def run_attention(dut):
    rng = np.random.default_rng(P.get("seed", 0))
    tb = TB(dut, seed=P.get("seed", 0), stalls=P.get("stalls", 0.0))
    await tb.reset()
    for case in P["cases"]:
        await check_launch(tb, make_heads(rng, **case))


@cocotb.test()
async def run_bad_arguments(dut):
    tb = TB(dut)
    await tb.reset()
    rng = np.random.default_rng(1)
    engines = make_heads(rng, 1, 4, 4, n_sink=1, n_body=32, n_window=8)
    image = build_image(engines)
    tb.load(image)
    args = image.args
    e0 = {f: R.engine_arg(0, f) for f in (*R.POINTER_ARGS, *R.COUNT_FIELDS)}
    bad = [
        (dict(op=9), R.STATUS_BAD_OP),
        (dict(op=R.OP_SHRINK, kind=2), R.STATUS_BAD_KIND),
        (dict(head_dim=HD * 2), R.STATUS_BAD_HEAD_DIM),
        (dict(group=G + 1), R.STATUS_BAD_GROUP),
        (dict(k_bits=3), R.STATUS_BAD_BITS),
        (dict(op=R.OP_SHRINK, kind=1, v_bits=2), R.STATUS_BAD_BITS),
        ({e0["n_sink"]: 0, e0["n_body"]: 0, e0["n_window"]: 0}, R.STATUS_BAD_TOKENS),
        ({e0["n_body"]: 70000}, R.STATUS_BAD_TOKENS),
        (dict(n_heads=0), R.STATUS_BAD_TOKENS),
        (dict(op=R.OP_COPY, kind=0, **{e0["n_window"]: 0}), R.STATUS_BAD_TOKENS),
        (dict(partial=args["partial"] + 4), R.STATUS_BAD_ADDRESS),
        ({e0["base"]: args[e0["base"]] + 32}, R.STATUS_BAD_ADDRESS),
        ({e0["records"]: args[e0["records"]] + 16}, R.STATUS_BAD_ADDRESS),
    ]
    if ENGINES > 1:   # another engine's base is checked too, though that engine has no tokens
        bad.append(({R.engine_arg(ENGINES - 1, "base"): 8}, R.STATUS_BAD_ADDRESS))
    for change, code in bad:
        status, _ = await tb.launch({**args, **change})
        assert status == code, (change, status)
    # and the kernel still works afterwards
    await check_launch_args(tb, engines, image, args)


def region(ram, addr, nbytes):
    return bytes(ram.read(addr, nbytes))


def join(a, b):
    return QuantizedKV(np.concatenate([a.codes, b.codes]), np.concatenate([a.scale, b.scale]),
                       np.concatenate([a.zero, b.zero]), a.bits)


@cocotb.test()
async def run_shrink_copy_attention(dut):
    """On every engine's slice: SHRINK keys and values in place, flush the window into the body (SHRINK the
    window, COPY it; only engines holding a window), then ATTENTION over the result: every step checked
    against the golden model's integer shrink."""
    tb = TB(dut, seed=7, stalls=P.get("stalls", 0.0))
    await tb.reset()
    rng = np.random.default_rng(P.get("seed", 5))
    slices = P.get("slices") or [(1, 64, 32)]
    engines = make_heads(rng, 2, 8, 4, slices=slices, outliers=True)
    image = build_image(engines)
    tb.load(image)
    args = dict(image.args)

    def check_block(e, kind, h, code_off, meta_off, block):
        ram, base = tb.rams[e], image.bases[e]
        if block is None:
            return
        k = "kv"[kind]
        packed = pack_codes(block.codes, block.bits, tb.word_bits).tobytes()
        assert region(ram, base + image.offset(f"{k}_codes", h) + code_off, len(packed)) == packed
        meta = pack_metadata(block.scale, block.zero).astype("<u4").tobytes()
        assert region(ram, base + image.offset(f"{k}_meta", h) + meta_off, len(meta)) == meta

    def each_block(fn):
        for e, heads in enumerate(engines):
            for h, hd in enumerate(heads):
                fn(e, h, hd)

    # 1. SHRINK the key bodies 8 -> 4 and the value bodies 4 -> 2, every engine at once
    for kind, bits in ((0, 8), (1, 4)):
        status, _ = await tb.launch({**args, "op": R.OP_SHRINK, "kind": kind,
                                     ("k_bits" if kind == 0 else "v_bits"): bits})
        assert status == R.STATUS_OK, R.STATUS_NAMES[status]

    def shrunk(e, h, hd):
        hd.keys = (hd.keys[0], hd.keys[1] and shrink(hd.keys[1]), hd.keys[2])
        hd.values = (hd.values[0], hd.values[1] and shrink(hd.values[1]), hd.values[2])
        check_block(e, 0, h, args["k_body_off"], args["meta_body_off"], hd.keys[1])
        check_block(e, 1, h, args["v_body_off"], args["meta_body_off"], hd.values[1])
    each_block(shrunk)
    # 2. attention over the shrunk bodies
    args.update(k_bits=4, v_bits=2)
    await check_launch_args(tb, engines, image, args)
    # 3. flush each window into its engine's body: SHRINK it 16 -> 8 -> 4 (keys) / -> 2 (values), COPY.
    # Engines differ in body length, so (as the host does) one engine per launch: the others' counts are 0.
    zero = {R.engine_arg(e, f): 0 for e in range(ENGINES) for f in R.COUNT_FIELDS}
    for e, (ns, nb, nw) in enumerate(slices):
        if not nw:
            continue
        for kind, target in ((0, 4), (1, 2)):
            k = "kv"[kind]
            bits = 16
            while bits > target:
                status, _ = await tb.launch({**args, **zero, "op": R.OP_SHRINK, "kind": kind,
                                             R.engine_arg(e, "n_body"): nw, f"{k}_bits": bits,
                                             f"{k}_body_off": image.args[f"{k}_window_off"],
                                             "meta_body_off": image.args["meta_window_off"]})
                assert status == R.STATUS_OK, R.STATUS_NAMES[status]
                bits //= 2
            status, _ = await tb.launch({**args, **zero, "op": R.OP_COPY, "kind": kind, f"{k}_bits": target,
                                         R.engine_arg(e, "n_window"): nw,
                                         f"{k}_body_off": image.args[f"{k}_body_off"] + nb * HD * target // 8,
                                         "meta_body_off": image.args["meta_body_off"] + 4 * nb})
            assert status == R.STATUS_OK, R.STATUS_NAMES[status]

    def flushed(e, h, hd):
        if hd.keys[2] is None:
            return
        kw, vw = shrink_to(hd.keys[2], 4), shrink_to(hd.values[2], 2)
        hd.keys = (hd.keys[0], join(hd.keys[1], kw) if hd.keys[1] else kw, None)
        hd.values = (hd.values[0], join(hd.values[1], vw) if hd.values[1] else vw, None)
        check_block(e, 0, h, args["k_body_off"], args["meta_body_off"], hd.keys[1])
        check_block(e, 1, h, args["v_body_off"], args["meta_body_off"], hd.values[1])
    each_block(flushed)
    # 4. attention over sink + the grown bodies, no window
    for e, (ns, nb, nw) in enumerate(slices):
        args.update({R.engine_arg(e, "n_body"): nb + nw, R.engine_arg(e, "n_window"): 0})
    await check_launch_args(tb, engines, image, args)


async def check_launch_args(tb, engines, image, args):
    """Launch, then compare every engine's partial records with its slice's golden partials; an engine with
    no tokens must leave its partial records untouched (the bench zeroed them)."""
    for e, ram in enumerate(tb.rams):   # zero the partial records, so stale results cannot pass
        n = len(engines[e])
        ram.write(image.records[e] + args["partial"], bytes(n * G * R.partial_record_bytes(HD)))
    status, cycles = await tb.launch(args)
    assert status == R.STATUS_OK, R.STATUS_NAMES[status]
    for e, heads in enumerate(engines):
        n = len(heads)
        raw = tb.rams[e].read(image.records[e] + args["partial"], n * G * R.partial_record_bytes(HD))
        want = expected_partials(heads)
        if all(w is None for w in want):
            assert not any(raw), f"engine {e} has no tokens but wrote partial records"
            continue
        got = decode_partials(raw, n, G, HD)
        for h in range(n):
            for g in range(G):
                m, E, L, acc = got[h][g]
                assert (m, E, L) == (int(want[h].m[g]), want[h].E, int(want[h].L[g])), f"engine {e} head {h} g {g}"
                np.testing.assert_array_equal(acc, want[h].acc[g])
    return cycles
