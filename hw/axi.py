"""AXI building blocks of the Vitis RTL kernel: the AXI4-Lite control slave (ap_ctrl_hs) and the AXI4
burst read/write masters that stream an engine's data from and to HBM.

Ports are plain named Signals (`s_axi_control_awvalid`, `m_axi_gmem0_araddr`, ...) so the exported
Verilog carries the names Vitis and cocotbext-axi expect.
"""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Elaboratable, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .regmap import AP_DONE, AP_IDLE, AP_READY, AP_START, CONTROL_ADDR_BITS, CTRL, GIE, IER, ISR

BURST_MAX = 64          # beats per AXI burst (64 x 64 bytes = one 4 KiB page)
PAGE_BYTES = 4096       # AXI bursts must not cross a 4 KiB boundary

# name -> (width, direction seen from the kernel)
_LITE = {"awvalid": (1, "i"), "awready": (1, "o"), "awaddr": (CONTROL_ADDR_BITS, "i"), "wvalid": (1, "i"), "wready": (1, "o"),
         "wdata": (32, "i"), "wstrb": (4, "i"), "bvalid": (1, "o"), "bready": (1, "i"), "bresp": (2, "o"),
         "arvalid": (1, "i"), "arready": (1, "o"), "araddr": (CONTROL_ADDR_BITS, "i"), "rvalid": (1, "o"), "rready": (1, "i"),
         "rdata": (32, "o"), "rresp": (2, "o")}


def _full(data_bits):
    # one AXI ID (all transactions in order); the ID ports exist because bus models expect them
    return {"awid": (1, "o"), "bid": (1, "i"), "arid": (1, "o"), "rid": (1, "i"),
            "awvalid": (1, "o"), "awready": (1, "i"), "awaddr": (64, "o"), "awlen": (8, "o"), "awsize": (3, "o"),
            "awburst": (2, "o"), "wvalid": (1, "o"), "wready": (1, "i"), "wdata": (data_bits, "o"),
            "wstrb": (data_bits // 8, "o"), "wlast": (1, "o"), "bvalid": (1, "i"), "bready": (1, "o"),
            "bresp": (2, "i"), "arvalid": (1, "o"), "arready": (1, "i"), "araddr": (64, "o"), "arlen": (8, "o"),
            "arsize": (3, "o"), "arburst": (2, "o"), "rvalid": (1, "i"), "rready": (1, "o"),
            "rdata": (data_bits, "i"), "rlast": (1, "i"), "rresp": (2, "i")}


class Bundle:
    """Named port signals of one bus; `.inputs` / `.outputs` for the top-level port list."""

    def __init__(self, prefix: str, spec: dict):
        self.prefix = prefix
        self.direction = {}
        for name, (width, direction) in spec.items():
            setattr(self, name, Signal(width, name=f"{prefix}_{name}"))
            self.direction[name] = direction

    @property
    def ports(self):
        return [getattr(self, n) for n in self.direction]


def axi_lite_bundle(prefix: str = "s_axi_control") -> Bundle:
    return Bundle(prefix, _LITE)


def axi_full_bundle(prefix: str, data_bits: int = 512) -> Bundle:
    return Bundle(prefix, _full(data_bits))


# channels of an AXI4 master bundle: (valid, ready, payload fields), and whether the master drives valid
_CHANNELS = {
    "ar": (True, ("araddr", "arlen", "arsize", "arburst", "arid")),
    "aw": (True, ("awaddr", "awlen", "awsize", "awburst", "awid")),
    "w": (True, ("wdata", "wstrb", "wlast")),
    "r": (False, ("rdata", "rlast", "rresp", "rid")),
    "b": (False, ("bresp", "bid")),
}


def _skid(m: Module, name: str, valid_i, ready_o, data_i, valid_o, ready_i, data_o) -> None:
    """One full-rate register stage of a valid/ready channel: valid, data and ready all leave a register
    (a skid buffer holds the beat that arrives while the output stalls), so the channel can cross an SLR
    boundary on registered SLLs at one beat per cycle."""
    out = Signal(len(data_i), name=f"{name}_out")
    out_v = Signal(name=f"{name}_out_v")
    buf = Signal(len(data_i), name=f"{name}_buf")
    buf_v = Signal(name=f"{name}_buf_v")
    m.d.comb += [ready_o.eq(~buf_v), valid_o.eq(out_v), data_o.eq(out)]
    with m.If(~out_v | ready_i):
        with m.If(buf_v):
            m.d.sync += [out.eq(buf), out_v.eq(1), buf_v.eq(0)]
        with m.Else():
            m.d.sync += [out.eq(data_i), out_v.eq(valid_i)]
    with m.Elif(valid_i & ~buf_v):
        m.d.sync += [buf.eq(data_i), buf_v.eq(1)]


class AxiSlice(Elaboratable):
    """`stages` register stages on all five channels between an AXI4 master (`inner`, the engine's side) and
    its port (`outer`): how an engine in SLR1/SLR2 reaches the HBM ports in SLR0 (one stage on each side of
    every SLR boundary it crosses, docs/bitstream.md). Adds 2 x stages cycles to a read's round trip; the
    throughput stays one beat per cycle on every channel."""

    def __init__(self, inner: Bundle, outer: Bundle, stages: int):
        if stages < 0:
            raise ValueError(f"stages must be >= 0, got {stages}")
        self.inner, self.outer, self.stages = inner, outer, stages

    def elaborate(self, platform):
        m = Module()
        for ch, (from_master, fields) in _CHANNELS.items():
            width = sum(len(getattr(self.inner, f)) for f in fields)
            src, dst = (self.inner, self.outer) if from_master else (self.outer, self.inner)
            valid, ready, data = getattr(src, f"{ch}valid"), getattr(src, f"{ch}ready"), Cat(
                *[getattr(src, f) for f in fields])
            for k in range(self.stages):
                nv, nr, nd = Signal(name=f"{ch}{k}_v"), Signal(name=f"{ch}{k}_r"), Signal(width, name=f"{ch}{k}_d")
                _skid(m, f"{ch}{k}", valid, ready, data, nv, nr, nd)
                valid, ready, data = nv, nr, nd
            m.d.comb += [getattr(dst, f"{ch}valid").eq(valid), ready.eq(getattr(dst, f"{ch}ready")),
                         Cat(*[getattr(dst, f) for f in fields]).eq(data)]
        return m


# ---------------------------------------------------------------------------------------------------------
class ControlRegisters(Elaboratable):
    """AXI4-Lite slave with the ap_ctrl_hs register map (regmap CTRL, GIE, IER, ISR) and
    32-bit argument registers; a 64-bit argument is two registers, low word first.

    Core side: `start` is high while ap_start is set; the core pulses `ack` when it takes the arguments
    (clears ap_start unless auto-restart, sets ap_ready), pulses `done` when finished, and drives `idle`.
    `status` and `debug` are read-only registers at `status_offset` and `debug_offset`; `constants` are
    read-only registers with fixed values (offset -> value)."""

    def __init__(self, bus: Bundle, args: dict[str, tuple[int, int]], status_offset: int,
                 debug_offset: int | None = None, constants: dict[int, int] | None = None):
        self.bus = bus
        self.args = {name: Signal(width, name=f"arg_{name}") for name, (_, width) in args.items()}
        self._offsets = {name: off for name, (off, _) in args.items()}
        self.status_offset = status_offset
        self.debug_offset = debug_offset
        self.constants = dict(constants or {})
        self.debug = Signal(32)
        self.start = Signal()
        self.ack = Signal()
        self.done = Signal()
        self.idle = Signal(init=1)
        self.status = Signal(32)
        self.interrupt = Signal()

    def _words(self):
        """(offset, signal slice) of every 32-bit argument word."""
        out = []
        for name, sig in self.args.items():
            off = self._offsets[name]
            for i in range(0, len(sig), 32):
                out.append((off + i // 8, sig[i:i + 32]))
        return out

    def elaborate(self, platform):
        m = Module()
        b = self.bus
        ap_start, ap_done, ap_ready, auto_restart = Signal(), Signal(), Signal(), Signal()
        gie, ier, isr = Signal(), Signal(2), Signal(2)
        m.d.comb += [self.start.eq(ap_start), self.interrupt.eq(gie & (isr != 0))]

        # ---- write channel: latch AW and W independently, then write and respond ----
        aw_full, w_full = Signal(), Signal()
        waddr = Signal(len(b.awaddr))
        wdata, wstrb = Signal(32), Signal(4)
        m.d.comb += [b.awready.eq(~aw_full), b.wready.eq(~w_full), b.bresp.eq(0), b.rresp.eq(0)]
        with m.If(b.awvalid & b.awready):
            m.d.sync += [aw_full.eq(1), waddr.eq(b.awaddr)]
        with m.If(b.wvalid & b.wready):
            m.d.sync += [w_full.eq(1), wdata.eq(b.wdata), wstrb.eq(b.wstrb)]
        with m.If(b.bvalid & b.bready):
            m.d.sync += b.bvalid.eq(0)
        do_write = Signal()
        m.d.comb += do_write.eq(aw_full & w_full & ~b.bvalid)
        word_addr = waddr & ~Const(3, len(waddr))
        with m.If(do_write):
            m.d.sync += [aw_full.eq(0), w_full.eq(0), b.bvalid.eq(1)]
            with m.Switch(word_addr):
                with m.Case(CTRL):
                    with m.If(wstrb[0]):
                        with m.If(wdata[0]):
                            m.d.sync += ap_start.eq(1)
                        m.d.sync += auto_restart.eq(wdata[7])
                with m.Case(GIE):
                    m.d.sync += gie.eq(wdata[0])
                with m.Case(IER):
                    m.d.sync += ier.eq(wdata[0:2])
                with m.Case(ISR):
                    m.d.sync += isr.eq(isr ^ wdata[0:2])
                for off, word in self._words():
                    with m.Case(off):
                        for byte in range(4):
                            with m.If(wstrb[byte]):
                                m.d.sync += word[8 * byte:8 * byte + 8].eq(wdata[8 * byte:8 * byte + 8])

        # ---- read channel ----
        raddr = b.araddr & ~Const(3, len(b.araddr))
        rvalue = Signal(32)
        with m.Switch(raddr):
            with m.Case(CTRL):
                # bit order of regmap.AP_START/AP_DONE/AP_IDLE/AP_READY (1, 2, 4, 8), auto-restart at bit 7
                assert (AP_START, AP_DONE, AP_IDLE, AP_READY) == (1, 2, 4, 8)
                m.d.comb += rvalue.eq(Cat(ap_start, ap_done, self.idle, ap_ready, Const(0, 3), auto_restart))
            with m.Case(GIE):
                m.d.comb += rvalue.eq(gie)
            with m.Case(IER):
                m.d.comb += rvalue.eq(ier)
            with m.Case(ISR):
                m.d.comb += rvalue.eq(isr)
            with m.Case(self.status_offset):
                m.d.comb += rvalue.eq(self.status)
            if self.debug_offset is not None:
                with m.Case(self.debug_offset):
                    m.d.comb += rvalue.eq(self.debug)
            for off, value in self.constants.items():
                with m.Case(off):
                    m.d.comb += rvalue.eq(value)
            for off, word in self._words():
                with m.Case(off):
                    m.d.comb += rvalue.eq(word)
        m.d.comb += b.arready.eq(~b.rvalid)
        read_ctrl = Signal()
        m.d.comb += read_ctrl.eq(b.arvalid & b.arready & (raddr == CTRL))
        with m.If(b.arvalid & b.arready):
            m.d.sync += [b.rvalid.eq(1), b.rdata.eq(rvalue)]
        with m.Elif(b.rvalid & b.rready):
            m.d.sync += b.rvalid.eq(0)

        # ---- handshake with the core (later statements win: an event beats a clear-on-read) ----
        with m.If(read_ctrl):
            m.d.sync += [ap_done.eq(0), ap_ready.eq(0)]
        with m.If(self.ack):
            m.d.sync += [ap_start.eq(auto_restart), ap_ready.eq(1)]
        with m.If(self.done):
            m.d.sync += [ap_done.eq(1), isr.eq(isr | ier)]
        return m


# ---------------------------------------------------------------------------------------------------------
def burst_len(addr, words, word_bytes: int, m: Module, name: str):
    """Beats of the next burst from `addr` with `words` left: at most BURST_MAX, never crossing 4 KiB."""
    page_words = PAGE_BYTES // word_bytes
    shift = (word_bytes - 1).bit_length()
    to_page = Signal(range(page_words + 1), name=f"{name}_to_page")
    m.d.comb += to_page.eq(page_words - (addr[shift:] & (page_words - 1)))
    cap = min(BURST_MAX, page_words)
    n = Signal(range(cap + 1), name=f"{name}_len")
    lim = Mux(to_page < cap, to_page, cap)
    m.d.comb += n.eq(Mux(words < lim, words, lim))
    return n


def command_layout(words_bits: int = 24):
    return data.StructLayout({"addr": unsigned(64), "words": unsigned(words_bits)})


class ReadChannel(wiring.Component):
    """One logical read stream: commands (addr, words) in, data words out, through a FIFO of `depth` words.

    A burst is requested only when the FIFO has room for all of it (space is reserved at request time), so
    read data is never back-pressured and the AXI R channel always flows."""

    def __init__(self, data_bits: int, depth: int):
        self.data_bits, self.depth = data_bits, depth
        super().__init__({
            "cmd": In(stream.Signature(command_layout())),
            "data": Out(stream.Signature(unsigned(data_bits))),
            # to the arbiter
            "req_valid": Out(1), "req_addr": Out(64), "req_len": Out(range(BURST_MAX + 1)), "req_grant": In(1),
            "beat_valid": In(1), "beat_data": In(data_bits),
            "active": Out(1),    # a command still has words to request
        })

    def elaborate(self, platform):
        m = Module()
        word_bytes = self.data_bits // 8
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=self.data_bits, depth=self.depth)
        addr = Signal(64)
        left = Signal(24)
        active = Signal()
        reserved = Signal(range(self.depth + 1))   # beats requested, not yet arrived
        n = burst_len(addr, left, word_bytes, m, "rd")
        free = Signal(range(self.depth + 2))
        m.d.comb += free.eq(self.depth - fifo.level - reserved)
        m.d.comb += [
            self.cmd.ready.eq(~active),
            self.req_valid.eq(active & (left != 0) & (free >= n)),
            self.req_addr.eq(addr), self.req_len.eq(n),
            fifo.w_data.eq(self.beat_data), fifo.w_en.eq(self.beat_valid),
            self.data.payload.eq(fifo.r_data), self.data.valid.eq(fifo.r_rdy), fifo.r_en.eq(self.data.ready),
            self.active.eq(active),
        ]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [addr.eq(self.cmd.payload.addr), left.eq(self.cmd.payload.words),
                         active.eq(self.cmd.payload.words != 0)]
        granted = self.req_valid & self.req_grant
        with m.If(granted):
            m.d.sync += [addr.eq(addr + n * word_bytes), left.eq(left - n)]
        with m.If(active & ((left == 0) | (granted & (left == n)))):
            m.d.sync += active.eq(0)
        m.d.sync += reserved.eq(reserved + Mux(granted, n, 0) - self.beat_valid)
        return m


class ReadArbiter(Elaboratable):
    """Shares one AXI4 read port among ReadChannels: AR by priority level, round-robin within a level;
    in-order R routing by a tag FIFO.

    A channel may request only while no channel of a lower `level` still has words to request. The
    consumer takes the streams in level order (keys, then value metadata, then values), so reading ahead
    for a later stream never steals port cycles the current one needs; the later stream's FIFO fills
    while the current one's last requests are in flight, so the port stays busy across the switch."""

    def __init__(self, bus: Bundle, channels: list[ReadChannel], max_outstanding: int = 16, levels=None):
        self.bus, self.channels, self.max_outstanding = bus, channels, max_outstanding
        self.levels = list(levels) if levels is not None else [0] * len(channels)

    def elaborate(self, platform):
        m = Module()
        b, chans = self.bus, self.channels
        n = len(chans)
        word_bytes = len(b.rdata) // 8
        m.submodules.order = order = SyncFIFOBuffered(width=max(1, (n - 1).bit_length()), depth=self.max_outstanding)
        last = Signal(range(n))
        # round-robin: the first requesting channel after `last`
        pick = Signal(range(n))
        any_req = Signal()
        allowed = []
        for i, c in enumerate(chans):
            earlier = [d.active for d, lv in zip(chans, self.levels) if lv < self.levels[i]]
            ok = Signal(name=f"allowed_{i}")
            m.d.comb += ok.eq(c.req_valid & ~(Cat(*earlier).any() if earlier else Const(0)))
            allowed.append(ok)
        with m.Switch(last):
            for cur in range(n):
                with m.Case(cur):
                    for j in reversed(range(n)):
                        idx = (cur + 1 + j) % n
                        with m.If(allowed[idx]):
                            m.d.comb += [pick.eq(idx), any_req.eq(1)]
        ar_valid = Signal()
        m.d.comb += ar_valid.eq(any_req & order.w_rdy)
        addr_arr = Array(c.req_addr for c in chans)
        len_arr = Array(c.req_len for c in chans)
        m.d.comb += [
            b.arvalid.eq(ar_valid), b.araddr.eq(addr_arr[pick]), b.arlen.eq(len_arr[pick] - 1),
            b.arsize.eq((word_bytes - 1).bit_length()), b.arburst.eq(1),
            order.w_data.eq(pick), order.w_en.eq(ar_valid & b.arready),
        ]
        for i, c in enumerate(chans):
            m.d.comb += c.req_grant.eq(ar_valid & b.arready & (pick == i))
        with m.If(ar_valid & b.arready):
            m.d.sync += last.eq(pick)
        # R: data returns in request order (one AXI ID)
        m.d.comb += [b.rready.eq(order.r_rdy), order.r_en.eq(b.rvalid & b.rlast & order.r_rdy)]
        for i, c in enumerate(chans):
            m.d.comb += [c.beat_valid.eq(b.rvalid & order.r_rdy & (order.r_data == i)), c.beat_data.eq(b.rdata)]
        return m


class BurstWriter(wiring.Component):
    """AXI4 write master: commands (addr, words) and a data stream in; bursts out; `idle` once every
    write response has come back."""

    def __init__(self, bus: Bundle, max_outstanding: int = 16):
        self.bus, self.max_outstanding = bus, max_outstanding
        data_bits = len(bus.wdata)
        super().__init__({
            "cmd": In(stream.Signature(command_layout())),
            "data": In(stream.Signature(unsigned(data_bits))),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        b = self.bus
        word_bytes = len(b.wdata) // 8
        addr, left, active = Signal(64), Signal(24), Signal()
        n = burst_len(addr, left, word_bytes, m, "wr")
        m.submodules.lens = lens = SyncFIFOBuffered(width=7, depth=self.max_outstanding)
        pending = Signal(range(self.max_outstanding + 1))   # bursts whose response is outstanding
        m.d.comb += [
            self.cmd.ready.eq(~active),
            b.awvalid.eq(active & (left != 0) & lens.w_rdy & (pending < self.max_outstanding)),
            b.awaddr.eq(addr), b.awlen.eq(n - 1), b.awsize.eq((word_bytes - 1).bit_length()), b.awburst.eq(1),
            lens.w_data.eq(n), lens.w_en.eq(b.awvalid & b.awready),
        ]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [addr.eq(self.cmd.payload.addr), left.eq(self.cmd.payload.words),
                         active.eq(self.cmd.payload.words != 0)]
        aw_go = b.awvalid & b.awready
        with m.If(aw_go):
            m.d.sync += [addr.eq(addr + n * word_bytes), left.eq(left - n)]
        with m.If(active & ((left == 0) | (aw_go & (left == n)))):
            m.d.sync += active.eq(0)
        # W: beats of the bursts in AW order
        beat = Signal(7)
        m.d.comb += [
            b.wvalid.eq(lens.r_rdy & self.data.valid), b.wdata.eq(self.data.payload),
            b.wstrb.eq(Const(-1, len(b.wstrb))), b.wlast.eq(beat + 1 == lens.r_data),
            self.data.ready.eq(lens.r_rdy & b.wready),
            lens.r_en.eq(b.wvalid & b.wready & b.wlast),
        ]
        with m.If(b.wvalid & b.wready):
            m.d.sync += beat.eq(Mux(b.wlast, 0, beat + 1))
        m.d.comb += b.bready.eq(1)
        m.d.sync += pending.eq(pending + aw_go - (b.bvalid & b.bready))
        m.d.comb += self.idle.eq(~active & (pending == 0) & ~lens.r_rdy)
        return m
