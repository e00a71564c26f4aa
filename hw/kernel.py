"""The Vitis RTL kernel `pmkvq_attn`: AXI4-Lite control (ap_ctrl_hs), N engines, each a decode-attention
datapath fed from its own AXI4 master, bound to its own HBM pseudo-channel(s).

The register map and the device-memory layout are the contract in docs/kernel-interface.md
(`pmkvq_accel.hw.regmap`). One launch processes `n_heads` KV heads of one layer; engine e works in its own
buffers (the cache at `e{e}_base`, the records at `e{e}_records`) over its own token slice
(`e{e}_n_sink/n_body/n_window`) for every head. For each head it reads the G query records, streams the head's key metadata and codes, value metadata and codes in the
order the datapath consumes them (five read channels sharing the AXI port, bursts of up to 64 words, many
in flight), and writes the G partial records back. An engine with no tokens for the op sits the launch out.
Bad arguments end the launch at once with a status code (never a hang).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from amaranth.hdl import Array, Cat, ClockDomain, Const, Elaboratable, Module, Mux, Signal, signed, unsigned
from amaranth.back import verilog
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from . import regmap as R
from .attention import DecodeAttention, result_layout
from .axi import (AxiSlice, BurstWriter, ControlRegisters, ReadArbiter, ReadChannel, axi_full_bundle,
                  axi_lite_bundle)
from .config import DatapathConfig, WidthCode, code_of_bits, is_supported_bits
from .control import COUNT_BITS
from .dsp import PRIMITIVES
from .shrink import ShrinkUnit
from .values import ACC_BITS

@dataclass(frozen=True)
class KernelConfig:
    """word_bits is the AXI data width and the datapath word (512 on the U280). The memory layout does not
    depend on it (code blocks are bit streams, metadata a uint32 array, every block 64-byte aligned), so a
    narrower kernel (used to keep simulation builds small) reads the same images.
    Engine e's master is bound to the HBM pseudo-channels `engine_pcs(e)`: pcs_per_engine of them, in a
    contiguous range (link.cfg `sp=`); the host puts engine e's buffer in the first."""
    engines: int = 1
    pcs_per_engine: int = 1
    slr_stages: tuple = ()         # register stages between engine e's master and its port (() = none)
    word_bits: int = R.WORD_BITS
    head_dim: int = 64
    groups: int = 3
    max_tokens: int = R.ENGINE_MAX_TOKENS
    fifo_depth: int = 256          # words buffered per read channel (4 bursts of 64)
    max_outstanding: int = 16      # AXI read bursts in flight per engine
    datapath: DatapathConfig = field(init=False)

    def __post_init__(self):
        if not isinstance(self.engines, int) or not 1 <= self.engines <= R.MAX_ENGINES:
            raise ValueError(f"engines must be 1..{R.MAX_ENGINES}, got {self.engines!r}")
        if not isinstance(self.pcs_per_engine, int) or self.pcs_per_engine < 1 or \
                self.engines * self.pcs_per_engine > R.HBM_PCS:
            raise ValueError(f"{self.engines} engines x {self.pcs_per_engine} pseudo-channels each do not fit "
                             f"the card's {R.HBM_PCS} HBM pseudo-channels")
        stages = tuple(self.slr_stages) or (0,) * self.engines     # () = no stages anywhere
        if len(stages) != self.engines or not all(isinstance(k, int) and 0 <= k <= 4 for k in stages):
            raise ValueError(f"slr_stages must give 0..4 register stages for each of the {self.engines} engines, "
                             f"got {self.slr_stages!r}")
        object.__setattr__(self, "slr_stages", stages)
        if self.fifo_depth < 64 or self.fifo_depth & (self.fifo_depth - 1):
            raise ValueError(f"fifo_depth must be a power of two >= 64, got {self.fifo_depth!r}")
        if self.word_bits not in (128, 256, 512):
            raise ValueError(f"word_bits must be 128, 256 or 512, got {self.word_bits!r}")
        object.__setattr__(self, "datapath", DatapathConfig(
            word_bits=self.word_bits, head_dim=self.head_dim, groups=self.groups,
            max_tokens=self.max_tokens, max_segments=R.ENGINE_SEGMENTS))

    @property
    def word_bytes(self) -> int:
        return self.word_bits // 8

    def engine_pcs(self, e: int) -> tuple[int, ...]:
        """The HBM pseudo-channels engine e's master is bound to (its buffer lives in the first)."""
        return R.engine_pcs(e, self.engines, self.pcs_per_engine)

    @property
    def query_words(self) -> int:
        return R.query_record_bytes(self.head_dim) // self.word_bytes

    @property
    def partial_words(self) -> int:
        return R.partial_record_bytes(self.head_dim) // self.word_bytes


def _ceil_shift(m: Module, value, shift: int, name: str, width: int = 24):
    """ceil(value / 2^shift) as a new signal."""
    out = Signal(width, name=name)
    m.d.comb += out.eq((value + ((1 << shift) - 1)) >> shift)
    return out


def _code_words(m: Module, n, lb, head_dim: int, word_bits: int, name: str):
    """Words of `n` tokens of `head_dim` codes at width code `lb` (2 << lb bits), rounded up."""
    bits = Signal(40, name=f"{name}_bits")
    m.d.comb += bits.eq(n << ((head_dim.bit_length() - 1) + 1 + lb))
    return _ceil_shift(m, bits, word_bits.bit_length() - 1, f"{name}_words")


def _word_stream(word_bits: int):
    return stream.Signature(unsigned(word_bits))


class WordSequencer(wiring.Component):
    """Hands the datapath one job's words in the order hw/attention.py consumes them (hw.jobs.job_words):
    per segment (sink, body, window; empty ones skipped), per group of mpw tokens, one key-metadata word and
    then the group's key code words; then every segment's value-metadata words; then every value code word.
    `start` (a pulse) begins a job over `counts` (tokens per segment) with the key body width `k_lb` (a width
    code; sink and window are 16-bit) and the job's value-metadata and value-code word totals, which all stay
    put until `done`."""

    def __init__(self, word_bits: int, head_dim: int):
        self.word_bits, self.head_dim = word_bits, head_dim
        w = _word_stream(word_bits)
        super().__init__({
            "start": In(1), "counts": In(COUNT_BITS).array(3), "k_lb": In(2),
            "vmeta_words": In(24), "vcode_words": In(24),
            "kmeta": In(w), "kcode": In(w), "vmeta": In(w), "vcode": In(w), "out": Out(w),
            "done": Out(1), "phase": Out(2), "src": Out(3), "seg": Out(2),
        })

    def elaborate(self, platform):
        m = Module()
        W, HD = self.word_bits, self.head_dim
        MPW = W // 32
        counts = list(self.counts)
        seg = self.seg               # index into the three (possibly empty) segments
        rem = Signal(COUNT_BITS)     # tokens of the segment not yet covered by a metadata group
        in_group = Signal(24)        # code words left in the current key group
        phase = Signal(2, init=3)    # 0 key pass, 1 value metadata, 2 value codes, 3 done
        left = Signal(24)            # words left in phase 1 / 2
        seg_klb = Signal(2)
        m.d.comb += [seg_klb.eq(Mux(seg == 1, self.k_lb, WidthCode.W16)),     # sink and window are 16-bit
                     self.phase.eq(phase), self.done.eq(phase == 3)]
        ntok = Signal(range(MPW + 1))
        m.d.comb += ntok.eq(Mux(rem > MPW, MPW, rem))
        group_words = _code_words(m, ntok, seg_klb, HD, W, "grp")
        src = self.src  # 0 none, 1 kmeta, 2 kcode, 3 vmeta, 4 vcode
        with m.Switch(phase):
            with m.Case(0):
                m.d.comb += src.eq(Mux(in_group != 0, 2, Mux(rem != 0, 1, 0)))
            with m.Case(1):
                m.d.comb += src.eq(Mux(left != 0, 3, 0))
            with m.Case(2):
                m.d.comb += src.eq(Mux(left != 0, 4, 0))
        for i, c in enumerate((self.kmeta, self.kcode, self.vmeta, self.vcode), start=1):
            m.d.comb += c.ready.eq((src == i) & self.out.ready)
            with m.If(src == i):
                m.d.comb += [self.out.valid.eq(c.valid), self.out.payload.eq(c.payload)]
        took = self.out.valid & self.out.ready
        with m.Switch(phase):
            with m.Case(0):
                with m.If((src == 1) & took):
                    m.d.sync += [in_group.eq(group_words), rem.eq(rem - ntok)]
                with m.If((src == 2) & took):
                    m.d.sync += in_group.eq(in_group - 1)
                with m.If(src == 0):
                    # segment finished: next segment, or the value metadata phase
                    with m.If(seg == 2):
                        m.d.sync += [phase.eq(1), left.eq(self.vmeta_words)]
                    with m.Else():
                        m.d.sync += [seg.eq(seg + 1), rem.eq(Mux(seg == 0, counts[1], counts[2]))]
            with m.Case(1):
                with m.If(took):
                    m.d.sync += left.eq(left - 1)
                with m.If(src == 0):
                    m.d.sync += [phase.eq(2), left.eq(self.vcode_words)]
            with m.Case(2):
                with m.If(took):
                    m.d.sync += left.eq(left - 1)
                with m.If(src == 0):
                    m.d.sync += phase.eq(3)
        with m.If(self.start):
            m.d.sync += [seg.eq(0), rem.eq(counts[0]), in_group.eq(0), phase.eq(0)]
        return m


class PartialRecords(wiring.Component):
    """The datapath's result beats (one per query head) as partial records (regmap.partial_dtype: int32 M,
    int32 E, int64 L, int64 acc[head_dim], word padded), one memory word per beat of `words`. The datapath
    holds a result beat, with every head's fields, until it is taken, so each word is selected in place from
    all G x partial_words record words at once by (head, word) (one select, no copy of a record or of one
    head's fields; a registered word), and the beat is taken with its head's last word."""

    def __init__(self, cfg: KernelConfig):
        self.cfg = cfg
        super().__init__({"result": In(stream.Signature(result_layout(cfg.datapath))),
                          "words": Out(_word_stream(cfg.word_bits))})

    def elaborate(self, platform):
        m = Module()
        pw, W, G, HD = self.cfg.partial_words, self.cfg.word_bits, self.cfg.groups, self.cfg.head_dim
        rp = self.result.payload
        e32 = Signal(signed(32))
        m.d.comb += e32.eq(rp.e.as_signed())
        words = []
        for g in range(G):
            fields = Cat(rp.m.word_select(g, 32), e32, rp.l.word_select(g, 64),
                         rp.acc.word_select(g, HD * ACC_BITS))
            rec = Cat(fields, Const(0, pw * W - len(fields)))
            words += [rec.word_select(k, W) for k in range(pw)]
        k = Signal(range(pw))                  # the word of the held beat's record registered next
        idx = Signal(range(G * pw))
        m.d.comb += idx.eq(rp.head * pw + k)
        adv = ~self.words.valid | self.words.ready
        take = self.result.valid & adv
        m.d.comb += self.result.ready.eq(take & (k == pw - 1))
        with m.If(adv):
            m.d.sync += self.words.valid.eq(self.result.valid)
        with m.If(take):
            m.d.sync += [self.words.payload.eq(Array(words)[idx]), k.eq(Mux(k == pw - 1, 0, k + 1))]
        return m


class BlockMover(wiring.Component):
    """SHRINK / COPY of one block: its `code_words` code words (`codes` stream), then its `meta_words`
    metadata words (`meta` stream), through the shrink unit to width code `lb_out` (SHRINK) or unchanged
    (COPY), to `out` (the writer). `start` (a pulse) clears the counts; `written` counts words handed out."""

    def __init__(self, word_bits: int):
        self.word_bits = word_bits
        w = _word_stream(word_bits)
        super().__init__({"start": In(1), "shrink": In(1), "code_words": In(24), "meta_words": In(24),
                          "lb_out": In(2), "codes": In(w), "meta": In(w), "out": Out(w), "written": Out(24),
                          "shrink_valid": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.shrink = su = ShrinkUnit(self.word_bits)
        fed = Signal(24)       # words taken from the channels
        from_codes = fed < self.code_words
        more = fed < self.code_words + self.meta_words
        src_valid = Mux(from_codes, self.codes.valid, self.meta.valid)
        src_data = Mux(from_codes, self.codes.payload, self.meta.payload)
        take = Signal()
        m.d.comb += [self.codes.ready.eq(from_codes & take), self.meta.ready.eq(~from_codes & take),
                     self.shrink_valid.eq(su.o.valid)]
        with m.If(self.shrink):
            m.d.comb += [su.i.valid.eq(src_valid & more), su.i.payload.data.eq(src_data),
                         su.i.payload.kind.eq(~from_codes), su.i.payload.n_lb.eq(self.lb_out),
                         su.i.payload.last.eq(fed + 1 == self.code_words),
                         take.eq(su.i.valid & su.i.ready),
                         self.out.valid.eq(su.o.valid), self.out.payload.eq(su.o.payload.data),
                         su.o.ready.eq(self.out.ready)]
        with m.Else():
            m.d.comb += [take.eq(src_valid & more & self.out.ready),
                         self.out.valid.eq(src_valid & more), self.out.payload.eq(src_data)]
        with m.If(take):
            m.d.sync += fed.eq(fed + 1)
        with m.If(self.out.valid & self.out.ready):
            m.d.sync += self.written.eq(self.written + 1)
        with m.If(self.start):
            m.d.sync += [fed.eq(0), self.written.eq(0)]
        return m


class Engine(Elaboratable):
    """One engine: sequencer + read channels + datapath + partial-record writer on one AXI4 master."""

    def __init__(self, cfg: KernelConfig, index: int, bus, args: dict):
        self.cfg, self.index, self.bus, self.args = cfg, index, bus, args
        self.mine = {n: args[R.engine_arg(index, n)] for n in R.ENGINE_ARGS}   # this engine's slice
        self.start = Signal()     # pulse: launch with the (validated) arguments
        self.busy = Signal()
        self.debug = Signal(32)   # progress/diagnostic bits, readable at regmap.DEBUG

    def elaborate(self, platform):
        cfg, a, mine = self.cfg, self.args, self.mine
        HD, G = cfg.head_dim, cfg.groups
        WORD_BITS, WORD_BYTES = cfg.word_bits, cfg.word_bytes
        MPW = WORD_BITS // 32          # metadata entries per word
        m = Module()
        m.submodules.dp = dp = DecodeAttention(cfg.datapath)
        names = ("query", "kmeta", "kcode", "vmeta", "vcode")
        ch = {n: ReadChannel(WORD_BITS, cfg.fifo_depth) for n in names}
        for n, c in ch.items():
            m.submodules[f"rd_{n}"] = c
        # keys (and the query) first, then value metadata, then values: the order the datapath reads them
        m.submodules.arb = ReadArbiter(self.bus, [ch[n] for n in names], cfg.max_outstanding,
                                       levels=[0, 0, 0, 1, 2])
        m.submodules.wr = wr = BurstWriter(self.bus, cfg.max_outstanding)

        # ---- per-launch and per-head state ----
        head = Signal(16)
        x_mode = Signal()    # SHRINK / COPY data movement (the writer takes its words)
        w_issued = Signal()  # the current head's partial-record write command was taken
        queued = Signal(range(16))   # heads whose query was requested and whose job has not started
        take_job = Signal()
        seq_idle = Signal()
        counts = [mine[n] for n in R.COUNT_FIELDS]
        nz = [c != 0 for c in counts]
        k_lb = Signal(2)
        v_lb = Signal(2)
        m.d.comb += [k_lb.eq(code_of_bits(a["k_bits"])), v_lb.eq(code_of_bits(a["v_bits"]))]
        w16 = Const(WidthCode.W16.value, 2)     # sink and window are 16-bit
        klbs = [w16, k_lb, w16]
        vlbs = [w16, v_lb, w16]

        def code_words(n, lb, name):
            return _code_words(m, n, lb, HD, WORD_BITS, name)

        meta_words = [_ceil_shift(m, n, MPW.bit_length() - 1, f"meta_words_{i}") for i, n in enumerate(counts)]
        kcode_words = [code_words(n, lb, f"kc{i}") for i, (n, lb) in enumerate(zip(counts, klbs))]
        vcode_words = [code_words(n, lb, f"vc{i}") for i, (n, lb) in enumerate(zip(counts, vlbs))]

        qwords, pw = cfg.query_words * G, cfg.partial_words
        # Addresses are 32-bit offsets inside the engine's buffers (the contract's offsets are 32-bit), each
        # stream's buffer pointer added once where its command leaves (`cmd_off`, below).
        # The head's offsets (head * stride) are running sums: `first_head`/`next_head` set head and them
        # together, so no multiplier is needed for the run-time strides.
        k_off, v_off, meta_off, q_off, p_off = (Signal(R.OFFSET_BITS, name=n)
                                                for n in ("k_off", "v_off", "meta_off", "q_off", "p_off"))
        strides = ((k_off, a["k_codes_stride"]), (v_off, a["v_codes_stride"]), (meta_off, a["meta_stride"]),
                   (q_off, qwords * WORD_BYTES), (p_off, G * pw * WORD_BYTES))

        def first_head():
            return [head.eq(0)] + [off.eq(0) for off, _ in strides]

        def next_head():
            return [head.eq(head + 1)] + [off.eq(off + stride) for off, stride in strides]

        base, records = mine["base"], mine["records"]

        def offset(value, name):
            sig = Signal(R.OFFSET_BITS, name=name)
            m.d.comb += sig.eq(value)
            return sig

        k_codes = offset(a["k_codes"] + k_off, "k_codes")
        v_codes = offset(a["v_codes"] + v_off, "v_codes")
        k_meta = offset(a["k_meta"] + meta_off, "k_meta")
        v_meta = offset(a["v_meta"] + meta_off, "v_meta")
        extents = {
            "kmeta": [(k_meta, meta_words[0]), (k_meta + a["meta_body_off"], meta_words[1]),
                      (k_meta + a["meta_window_off"], meta_words[2])],
            "kcode": [(k_codes, kcode_words[0]), (k_codes + a["k_body_off"], kcode_words[1]),
                      (k_codes + a["k_window_off"], kcode_words[2])],
            "vmeta": [(v_meta, meta_words[0]), (v_meta + a["meta_body_off"], meta_words[1]),
                      (v_meta + a["meta_window_off"], meta_words[2])],
            "vcode": [(v_codes, vcode_words[0]), (v_codes + a["v_body_off"], vcode_words[1]),
                      (v_codes + a["v_window_off"], vcode_words[2])],
        }
        # each stream's command offset; its address is the buffer's base plus it (one 64-bit add per stream)
        cmd_off = {n: Signal(R.OFFSET_BITS, name=f"off_{n}") for n in names}
        wr_off = Signal(R.OFFSET_BITS)
        for n in names:
            m.d.comb += ch[n].cmd.payload.addr.eq((records if n == "query" else base) + cmd_off[n])
        m.d.comb += wr.cmd.payload.addr.eq(Mux(a["op"] == R.OP_ATTENTION, records, base) + wr_off)

        # ---- command feeders: each KV channel gets its (up to) three segment extents in order ----
        feed = Signal()      # high while the current head's KV commands are being issued
        fed = []
        for n, ext in extents.items():
            idx = Signal(2, name=f"ext_{n}")
            fed.append(idx == 3)
            c = ch[n].cmd
            with m.Switch(idx):
                for i, (addr, words) in enumerate(ext):
                    with m.Case(i):
                        m.d.comb += [cmd_off[n].eq(addr), c.payload.words.eq(words),
                                     c.valid.eq(feed & (words != 0))]
            with m.If(feed & (idx < 3) & (~c.valid | c.ready)):
                m.d.sync += idx.eq(idx + 1)
            with m.If(self.start | ~feed):
                m.d.sync += idx.eq(0)
        fed_all = Cat(*fed).all()

        # ---- query loader -> job descriptor ----
        qbuf = Signal(qwords * WORD_BITS)
        qcount = Signal(range(qwords + 1))
        qc = ch["query"]
        m.d.comb += qc.data.ready.eq(qcount != qwords)
        with m.If(qc.data.valid & qc.data.ready):
            m.d.sync += [qbuf.eq(Cat(qbuf[WORD_BITS:], qc.data.payload)), qcount.eq(qcount + 1)]
        rec_bits = cfg.query_words * WORD_BITS
        job = dp.job.payload
        m.d.comb += [
            job.q.eq(Cat(*[qbuf[g * rec_bits:g * rec_bits + 16 * HD] for g in range(G)])),
            job.qexp.eq(Cat(*[qbuf[g * rec_bits + 16 * HD:g * rec_bits + 16 * HD + 16] for g in range(G)])),
            job.nseg.eq(nz[0] + nz[1] + nz[2]),
        ]
        # compact the non-empty segments into slots 0..nseg-1
        slots = _compact(m, nz, [(c, kl, vl) for c, kl, vl in zip(counts, klbs, vlbs)])
        m.d.comb += [
            job.count.eq(Cat(*[s[0][:COUNT_BITS] for s in slots])),
            job.klb.eq(Cat(*[s[1] for s in slots])),
            job.vlb.eq(Cat(*[s[2] for s in slots])),
        ]

        # ---- data sequencer: the order hw.attention consumes words ----
        m.submodules.seq_words = sq = WordSequencer(WORD_BITS, HD)
        total_vmeta = Signal(24)
        total_vcode = Signal(24)
        m.d.comb += [total_vmeta.eq(meta_words[0] + meta_words[1] + meta_words[2]),
                     total_vcode.eq(vcode_words[0] + vcode_words[1] + vcode_words[2]),
                     sq.k_lb.eq(k_lb), sq.vmeta_words.eq(total_vmeta), sq.vcode_words.eq(total_vcode),
                     dp.data.valid.eq(sq.out.valid), dp.data.payload.eq(sq.out.payload),
                     sq.out.ready.eq(dp.data.ready)]
        m.d.comb += [sq.counts[i].eq(c) for i, c in enumerate(counts)]

        # ---- results -> partial records -> writer ----
        m.submodules.records = recs = PartialRecords(cfg)
        wiring.connect(m, dp.result, recs.result)
        results = Signal(range(G + 1))
        with m.If(dp.result.valid & dp.result.ready):
            m.d.sync += results.eq(results + 1)

        # ---- SHRINK / COPY: one block per head through the kcode (codes) and kmeta (metadata) channels ----
        values = a["kind"][0]
        x_lb = Signal(2)
        m.d.comb += x_lb.eq(Mux(values, v_lb, k_lb))
        base_codes = offset(Mux(values, v_codes, k_codes), "x_codes_base")
        base_meta = offset(Mux(values, v_meta, k_meta), "x_meta_base")
        body_off = Mux(values, a["v_body_off"], a["k_body_off"])
        window_off = Mux(values, a["v_window_off"], a["k_window_off"])
        is_shrink = a["op"] == R.OP_SHRINK
        x_tokens = Signal(COUNT_BITS)
        m.d.comb += x_tokens.eq(Mux(is_shrink, mine["n_body"], mine["n_window"]))
        x_in = code_words(x_tokens, x_lb, "x_in")                 # code words read
        x_lb_out = Signal(2)
        m.d.comb += x_lb_out.eq(x_lb - 1)
        x_out = code_words(x_tokens, x_lb_out, "x_out")           # code words written by SHRINK
        x_meta = _ceil_shift(m, x_tokens, MPW.bit_length() - 1, "x_meta")
        x_codes_out = Signal(24)
        m.d.comb += x_codes_out.eq(Mux(is_shrink, x_out, x_in))
        x_src_codes = offset(base_codes + Mux(is_shrink, body_off, window_off), "x_src_codes")
        x_src_meta = offset(base_meta + Mux(is_shrink, a["meta_body_off"], a["meta_window_off"]), "x_src_meta")
        x_dst_codes = offset(base_codes + body_off, "x_dst_codes")
        x_dst_meta = offset(base_meta + a["meta_body_off"], "x_dst_meta")
        x_meta_cmd = Signal()    # the metadata write command has been issued
        kc, km = ch["kcode"], ch["kmeta"]
        m.submodules.mover = mv = BlockMover(WORD_BITS)
        m.d.comb += [mv.shrink.eq(is_shrink), mv.code_words.eq(x_in), mv.meta_words.eq(x_meta),
                     mv.lb_out.eq(x_lb_out)]
        # the kcode/kmeta channels feed the block mover in SHRINK/COPY, the sequencer in ATTENTION; the writer
        # takes the mover's words or the partial records
        for c, seq_in, mv_in in ((kc, sq.kcode, mv.codes), (km, sq.kmeta, mv.meta)):
            m.d.comb += [seq_in.payload.eq(c.data.payload), mv_in.payload.eq(c.data.payload),
                         seq_in.valid.eq(c.data.valid & ~x_mode), mv_in.valid.eq(c.data.valid & x_mode),
                         c.data.ready.eq(Mux(x_mode, mv_in.ready, seq_in.ready))]
        for c, seq_in in ((ch["vmeta"], sq.vmeta), (ch["vcode"], sq.vcode)):
            wiring.connect(m, c.data, seq_in)
        with m.If(x_mode):
            m.d.comb += [wr.data.valid.eq(mv.out.valid), wr.data.payload.eq(mv.out.payload),
                         mv.out.ready.eq(wr.data.ready)]
        with m.Else():
            m.d.comb += [wr.data.valid.eq(recs.words.valid), wr.data.payload.eq(recs.words.payload),
                         recs.words.ready.eq(wr.data.ready)]

        # ---- head loop ----
        n_heads = a["n_heads"]
        has_tokens = Signal()   # this engine takes part in the launch: it holds tokens the op acts on
        m.d.comb += has_tokens.eq(Mux(a["op"] == R.OP_ATTENTION, nz[0] | nz[1] | nz[2], x_tokens != 0))
        with m.FSM(name=f"engine{self.index}") as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += first_head()
                    with m.If(has_tokens):
                        with m.If(a["op"] == R.OP_ATTENTION):
                            m.next = "QUERY"
                        with m.Else():
                            m.next = "X_ISSUE"
            with m.State("X_ISSUE"):
                m.d.comb += [kc.cmd.valid.eq(1), cmd_off["kcode"].eq(x_src_codes), kc.cmd.payload.words.eq(x_in),
                             km.cmd.valid.eq(1), cmd_off["kmeta"].eq(x_src_meta),
                             km.cmd.payload.words.eq(x_meta),
                             wr.cmd.valid.eq(1), wr_off.eq(x_dst_codes),
                             wr.cmd.payload.words.eq(x_codes_out), mv.start.eq(1)]
                m.d.sync += x_meta_cmd.eq(0)
                m.next = "X_RUN"   # every channel and the writer are idle here: all three commands are taken
            with m.State("X_RUN"):
                m.d.comb += x_mode.eq(1)
                with m.If(~x_meta_cmd):
                    m.d.comb += [wr.cmd.valid.eq(1), wr_off.eq(x_dst_meta),
                                 wr.cmd.payload.words.eq(x_meta)]
                    with m.If(wr.cmd.ready):
                        m.d.sync += x_meta_cmd.eq(1)
                with m.If(x_meta_cmd & (mv.written == x_codes_out + x_meta) & wr.idle):
                    with m.If(head + 1 < n_heads):
                        m.d.sync += next_head()
                        m.next = "X_ISSUE"
                    with m.Else():
                        m.next = "IDLE"
            # ATTENTION, feed side: query and KV read commands and the partial-record write command of
            # one head; the next head's commands go out as soon as this head's have all been requested,
            # so the port streams across heads while the sequencer below finishes the previous one.
            with m.State("QUERY"):
                m.d.comb += [qc.cmd.valid.eq(1),
                             cmd_off["query"].eq(a["query"] + q_off),
                             qc.cmd.payload.words.eq(qwords)]
                with m.If(qc.cmd.ready):
                    m.d.sync += w_issued.eq(0)
                    m.next = "FEED"
            with m.State("FEED"):
                m.d.comb += feed.eq(1)
                m.d.comb += [wr.cmd.valid.eq(~w_issued),
                             wr_off.eq(a["partial"] + p_off),
                             wr.cmd.payload.words.eq(G * pw)]
                with m.If(wr.cmd.valid & wr.cmd.ready):
                    m.d.sync += w_issued.eq(1)
                with m.If(w_issued & fed_all & ~Cat(*[c.active for c in ch.values()]).any()):
                    with m.If(head + 1 < n_heads):
                        m.d.sync += next_head()
                        m.next = "QUERY"
                    with m.Else():
                        m.next = "FINISH"
            with m.State("FINISH"):
                with m.If(seq_idle & (queued == 0) & wr.idle):
                    m.next = "IDLE"

        # ATTENTION, sequencer side: one job per queued head, in order
        with m.If(fsm.ongoing("QUERY") & qc.cmd.ready):
            m.d.sync += queued.eq(queued + 1 - take_job)
        with m.Elif(take_job):
            m.d.sync += queued.eq(queued - 1)
        with m.FSM(name=f"sequencer{self.index}") as seq:
            with m.State("IDLE"):
                m.d.comb += seq_idle.eq(1)
                with m.If(queued != 0):
                    m.next = "LOAD"
            with m.State("LOAD"):
                with m.If(qcount == qwords):
                    m.d.comb += [dp.job.valid.eq(1), take_job.eq(dp.job.ready), sq.start.eq(dp.job.ready)]
                    with m.If(dp.job.ready):
                        m.d.sync += [qcount.eq(0), results.eq(0)]
                        m.next = "RUN"
            with m.State("RUN"):
                with m.If(sq.done & (results == G) & ~recs.words.valid):
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        fields = debug_fields(
            state=Cat(*[fsm.ongoing(st) for st in ENGINE_STATES]), seq=Cat(seq.ongoing("LOAD"), seq.ongoing("RUN")),
            phase=sq.phase, src=sq.src, seg=sq.seg, data_valid=Cat(*[ch[n].data.valid for n in names]),
            cmd_ready=Cat(*[ch[n].cmd.ready for n in names]),
            dp=Cat(dp.job.ready, dp.data.ready, dp.result.valid), wr_idle=wr.idle,
            x=Cat(mv.shrink_valid, x_meta_cmd))
        m.d.comb += self.debug.eq(Cat(*fields))
        return m


ENGINE_STATES = ("IDLE", "QUERY", "FEED", "FINISH", "X_ISSUE", "X_RUN")
# The DEBUG register (regmap.DEBUG, engine 0): (field, bits) from bit 0 up. docs/kernel-interface.md lists it.
DEBUG_FIELDS = (("state", len(ENGINE_STATES)),   # one-hot engine state, in ENGINE_STATES order
                ("seq", 2),                        # sequencer LOAD, RUN
                ("phase", 2),                      # 0 key pass, 1 value metadata, 2 value codes, 3 done
                ("src", 3),                        # word source: 0 none, 1 kmeta, 2 kcode, 3 vmeta, 4 vcode
                ("seg", 2),                        # segment index (sink, body, window)
                ("data_valid", 5),                 # channel has data: query, kmeta, kcode, vmeta, vcode
                ("cmd_ready", 5),                  # channel takes a command (idle), same order
                ("dp", 3),                         # datapath job.ready, data.ready, result.valid
                ("wr_idle", 1),                    # writer idle
                ("x", 2))                          # SHRINK/COPY: shrink output valid, metadata command issued
assert sum(w for _, w in DEBUG_FIELDS) <= 32


def debug_fields(**signals):
    """The DEBUG fields in DEBUG_FIELDS order, each checked against its declared width."""
    out = []
    for name, width in DEBUG_FIELDS:
        sig = signals.pop(name)
        if len(sig) != width:
            raise AssertionError(f"debug field {name} is {len(sig)} bits, DEBUG_FIELDS says {width}")
        out.append(sig)
    if signals:
        raise AssertionError(f"debug fields not in DEBUG_FIELDS: {sorted(signals)}")
    return out


def _compact(m: Module, present, items):
    """Slots 0..2 holding the present items in order (absent slots zero)."""
    width = [len(x) if hasattr(x, "__len__") else 2 for x in items[0]]
    slots = []
    for k in range(3):
        outs = [Signal(w, name=f"slot{k}_{j}") for j, w in enumerate(width)]
        # item i lands in slot (number of present items before it)
        for i, item in enumerate(items):
            before = sum(present[j].as_unsigned() for j in range(i)) if i else Const(0, 2)
            with m.If(present[i] & (before == k)):
                m.d.comb += [o.eq(v) for o, v in zip(outs, item)]
        slots.append(outs)
    return slots


class Kernel(Elaboratable):
    """The top level `pmkvq_attn` with Vitis port names."""

    def __init__(self, cfg: KernelConfig = KernelConfig()):
        self.cfg = cfg
        self.ap_clk = Signal(name="ap_clk")
        self.ap_rst_n = Signal(name="ap_rst_n")
        self.interrupt = Signal(name="interrupt")
        self.control = axi_lite_bundle("s_axi_control")
        self.gmem = [axi_full_bundle(f"m_axi_gmem{e}", cfg.word_bits) for e in range(cfg.engines)]

    @property
    def ports(self):
        out = [self.ap_clk, self.ap_rst_n, self.interrupt] + self.control.ports
        for g in self.gmem:
            out += g.ports
        return out

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        m.domains.sync = cd = ClockDomain("sync")
        m.d.comb += [cd.clk.eq(self.ap_clk), cd.rst.eq(~self.ap_rst_n)]
        m.submodules.ctrl = ctrl = ControlRegisters(self.control, R.all_args(cfg.engines), R.STATUS, R.DEBUG,
                                                    constants={R.ENGINES: cfg.engines,
                                                               R.PCS_PER_ENGINE: cfg.pcs_per_engine})
        a = ctrl.args
        engines = []
        for e, port in enumerate(self.gmem):
            stages = cfg.slr_stages[e]
            bus = port
            if stages:   # the engine sits in another SLR than the HBM ports: registered crossing
                bus = axi_full_bundle(f"engine{e}_gmem", cfg.word_bits)
                m.submodules[f"slr_slice{e}"] = AxiSlice(bus, port, stages)
            m.d.comb += [bus.awid.eq(0), bus.arid.eq(0)]   # one AXI ID; driven so that the ports export as outputs
            engines.append(Engine(cfg, e, bus, a))
            m.submodules[f"engine{e}"] = engines[-1]
        m.d.comb += self.interrupt.eq(ctrl.interrupt)

        # argument checks -> status (first failing check wins); token counts are per engine
        op = a["op"]
        attn = op == R.OP_ATTENTION
        too_many, some = [], []
        for e in range(cfg.engines):
            n = {f: a[R.engine_arg(e, f)] for f in R.COUNT_FIELDS}
            total = Signal(34, name=f"total{e}")
            m.d.comb += total.eq(n["n_sink"] + n["n_body"] + n["n_window"])
            xtok = Mux(op == R.OP_SHRINK, n["n_body"], n["n_window"])
            too_many.append(Mux(attn, total > cfg.max_tokens, xtok > cfg.max_tokens))
            some.append(Mux(attn, total != 0, xtok != 0))
        misaligned = Signal()
        m.d.comb += misaligned.eq(Cat(*[a[n][:6] != 0 for n in R.aligned_args(cfg.engines)]).any())
        status = Signal(32)
        xbits = Mux(a["kind"][0], a["v_bits"], a["k_bits"])
        checks = [
            ((op != R.OP_ATTENTION) & (op != R.OP_SHRINK) & (op != R.OP_COPY), R.STATUS_BAD_OP),
            (~attn & (a["kind"] > 1), R.STATUS_BAD_KIND),
            (a["head_dim"] != cfg.head_dim, R.STATUS_BAD_HEAD_DIM),
            (attn & (a["group"] != cfg.groups), R.STATUS_BAD_GROUP),
            (Mux(attn, ~is_supported_bits(a["k_bits"]) | ~is_supported_bits(a["v_bits"]),
                 ~is_supported_bits(xbits) | ((op == R.OP_SHRINK) & (xbits == 2))), R.STATUS_BAD_BITS),
            ((a["n_heads"] == 0) | ~Cat(*some).any() | Cat(*too_many).any(), R.STATUS_BAD_TOKENS),
            (misaligned, R.STATUS_BAD_ADDRESS),
        ]
        verdict = Const(R.STATUS_OK, 32)
        for cond, code in reversed(checks):
            verdict = Mux(cond, code, verdict)
        busy = Cat(*[e.busy for e in engines]).any()
        with m.FSM(name="top") as fsm:
            with m.State("IDLE"):
                with m.If(ctrl.start):
                    m.d.comb += ctrl.ack.eq(1)
                    m.next = "CHECK"
            with m.State("CHECK"):
                m.d.sync += status.eq(verdict)
                with m.If(verdict == R.STATUS_OK):
                    m.d.comb += [e.start.eq(1) for e in engines]
                    m.next = "WAIT"
                with m.Else():
                    m.next = "DONE"
            with m.State("WAIT"):
                with m.If(~busy):
                    m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += ctrl.done.eq(1)
                m.next = "IDLE"
        m.d.comb += [ctrl.idle.eq(fsm.ongoing("IDLE")), ctrl.status.eq(status), ctrl.debug.eq(engines[0].debug)]
        return m


def kernel_verilog(cfg: KernelConfig = KernelConfig(), primitives: bool = False) -> str:
    """Verilog of the whole kernel, top module `pmkvq_attn`. `primitives`: the hand-placed DSP48E2 slices as
    primitive instances (for Vivado and the estimates; hw/dsp.py), else as their behavioural models (for
    simulation)."""
    k = Kernel(cfg)
    return verilog.convert(k, name=R.KERNEL_NAME, platform=PRIMITIVES if primitives else None, ports=k.ports,
                           emit_src=False)
