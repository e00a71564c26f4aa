"""The whole decode-attention datapath for one KV head and its G query heads (docs/numerics.md 5-7).

One memory port: `data` takes one memory word per cycle, in the order written by
`pmkvq_accel.hw.jobs.job_words`:

  key pass    for each segment, for each group of mpw tokens: 1 key-metadata word, then its key code words
  value meta  for each segment: ceil(n / mpw) value-metadata words (stored on chip; E is computed here)
  value pass  for each segment: its value code words (a word with more tokens than the value pass has slots,
              2-bit codes, in two beats: its lower half, then its upper half; `DatapathConfig.value_halves`)

`job` carries the descriptor (query codes and exponents, segments (count, key width, value width)).
Scores are kept on chip (one buffer entry per mpw tokens) with the run maximum M; the value pass then
computes p, W, Z per token and accumulates W * c16. `result` emits one beat per query head `head`, whose
(M, L, E, acc[head_dim]) = `attention_partial` for that head are its lanes of the beat's fields.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import DelayLine
from .buffers import MetaBuffer, ScoreBuffer
from .config import DatapathConfig
from .control import COUNT_BITS, JobController, job_layout
from .macarray import MacArray, attach
from .runstats import RunSums, ScoreMax, ValueExponent
from .score import ScoreUnit
from .softmax import E_STAGE as W_E_STAGE, LATENCY as W_LATENCY, WeightUnit
from .unpack import Unpack
from .values import ACC_BITS, ValueMac


def result_layout(cfg: DatapathConfig):
    """One beat per query head `head`; the fields carry every head's M, L and accumulators (the consumer picks
    head `head`'s: the kernel's record writer selects its words from them directly, so no copy of one head's
    fields is muxed out first). E is the job's."""
    G = cfg.groups
    return data.StructLayout({
        "head": unsigned(3),
        "m": unsigned(G * 32),                          # head g at bits g*32
        "l": unsigned(G * 64),
        "e": unsigned(16),
        "acc": unsigned(G * cfg.head_dim * ACC_BITS),   # (g, d) at (g*head_dim + d)*64
    })


class DecodeAttention(wiring.Component):
    def __init__(self, cfg: DatapathConfig):
        if not isinstance(cfg, DatapathConfig):
            raise TypeError(f"DecodeAttention needs a DatapathConfig, got {cfg!r}")
        self.cfg = cfg
        super().__init__({
            "job": In(stream.Signature(job_layout(cfg))),
            "data": In(stream.Signature(unsigned(cfg.word_bits))),
            "result": Out(stream.Signature(result_layout(cfg))),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        W, HD, G, NJ, NV = cfg.word_bits, cfg.head_dim, cfg.groups, cfg.nj, cfg.value_slots
        f = cfg.field_bits
        m = Module()
        data_in = self.data

        # ---- sub-blocks ----------------------------------------------------------------------
        m.submodules.ctl = ctl = JobController(cfg)
        utag_layout = data.StructLayout({
            "kmeta": unsigned(NJ * 32), "first": 1, "last": 1, "sq": 1, "v": 1,
            "entry": unsigned(f["entry"]), "gl": unsigned(f["gl"]), "lb": unsigned(2),
            "ntok": unsigned(f["ntok"]), "clear": 1, "vlast": 1,
        })
        m.submodules.unpack = unpack = Unpack(cfg, tag_width=utag_layout.size)
        stag_layout = data.StructLayout({"entry": unsigned(f["entry"]), "gl": unsigned(f["gl"]),
                                         "lb": unsigned(2)})
        m.submodules.score = score = ScoreUnit(cfg, tag_width=stag_layout.size)
        wtag_layout = data.StructLayout({"first": 1})
        m.submodules.weight = weight = WeightUnit(cfg, tag_width=wtag_layout.size)
        m.submodules.mac = mac = ValueMac(cfg)
        m.submodules.array = array = MacArray(cfg)        # the score unit's and the MAC's DSP48E2 slices
        attach(m, array, score=score, mac=mac)
        m.submodules.score_buf = sbuf = ScoreBuffer(cfg)
        m.submodules.meta_buf = vbuf = MetaBuffer(cfg)
        m.submodules.score_max = smax = ScoreMax(cfg)
        m.submodules.exponent = expo = ValueExponent(cfg, rem_bits=COUNT_BITS)
        m.submodules.sums = sums = RunSums(cfg)
        m.d.comb += [score.o.ready.eq(1), weight.o.ready.eq(1), unpack.o.ready.eq(1),
                     score.q.eq(ctl.q), score.qexp.eq(ctl.qexp)]

        # ---- controller <-> ports ----------------------------------------------------------------
        wiring.connect(m, wiring.flipped(self.job), ctl.job)
        v_go_r = Signal()        # the value pass may start (below)
        m.d.comb += [ctl.word_valid.eq(data_in.valid), ctl.word.eq(data_in.payload), data_in.ready.eq(ctl.word_ready),
                     ctl.v_go.eq(v_go_r), ctl.mac_valid.eq(mac.o.valid), ctl.result_ready.eq(self.result.ready),
                     mac.o.ready.eq(ctl.mac_ready), self.result.valid.eq(ctl.result_valid)]

        # unpack input: the key beat (key pass / S_Q beat) or the delayed value word, through a register stage
        # (the key beat's token count and lane metadata are logic on the controller's registers); the value
        # words' delay line is one stage shorter for it
        dl_layout = data.StructLayout({"word": unsigned(W), "lb": unsigned(2), "wi": unsigned(f["wi"]),
                                       "ntok": unsigned(f["ntok"]), "half": 1, "tag": utag_layout})
        m.submodules.delay = delay = DelayLine(dl_layout, W_LATENCY - 1)
        key_tag = Signal(utag_layout)
        m.d.comb += [key_tag.gl.eq(ctl.gl), key_tag.entry.eq(ctl.entry), key_tag.lb.eq(ctl.lb),
                     key_tag.ntok.eq(ctl.ntok), key_tag.first.eq(ctl.w_first), key_tag.last.eq(ctl.w_last),
                     key_tag.kmeta.eq(ctl.kmeta), key_tag.sq.eq(ctl.sq)]
        vd = delay.o
        ui_valid = Signal()
        up = Signal(unpack.i_layout)
        m.d.sync += [
            ui_valid.eq(ctl.key_valid | vd.valid),
            # a value beat that is a word's upper half takes that half into the unpacker's lower slots
            up.word.eq(Mux(vd.valid, Mux(vd.payload.half, vd.payload.word[W // 2:], vd.payload.word),
                           Mux(ctl.key_valid, data_in.payload, 0))),
            up.lb.eq(Mux(vd.valid, vd.payload.lb, ctl.lb)),
            up.wi.eq(Mux(vd.valid, vd.payload.wi, ctl.wi)),
            up.ntok.eq(Mux(vd.valid, vd.payload.ntok, Mux(ctl.sq, 0, ctl.ntok))),
            up.tag.eq(Mux(vd.valid, vd.payload.tag, key_tag)),
        ]
        ui_tag = Signal(utag_layout)
        m.d.comb += [unpack.i.valid.eq(ui_valid), unpack.i.payload.eq(up), ui_tag.eq(up.tag)]
        uo_tag = Signal(utag_layout)
        m.d.comb += uo_tag.eq(unpack.o.payload.tag)
        # the array's mode is that of the beat in the unpack output (the unpack unit is one register stage and
        # never stalls here), registered from its input; it changes only while both users are empty
        value_mode = Signal()
        m.d.sync += value_mode.eq(Mux(ui_valid, ui_tag.v, value_mode))
        m.d.comb += array.value_mode.eq(value_mode)

        # unpack -> score unit (key side)
        sp = score.i.payload
        stag = Signal(stag_layout)
        m.d.comb += [
            score.i.valid.eq(unpack.o.valid & ~uo_tag.v),
            sp.c16.eq(unpack.o.payload.c16), sp.kmeta.eq(uo_tag.kmeta), sp.lb.eq(uo_tag.lb),
            sp.ntok.eq(uo_tag.ntok), sp.first.eq(uo_tag.first), sp.last.eq(uo_tag.last), sp.sq.eq(uo_tag.sq),
            stag.entry.eq(uo_tag.entry), stag.gl.eq(uo_tag.gl), stag.lb.eq(uo_tag.lb),
            sp.tag.eq(stag),
        ]

        # score unit -> score buffer + running max
        so_tag = Signal(stag_layout)
        so = score.o.payload
        m.d.comb += [so_tag.eq(so.tag),
                     sbuf.valid.eq(score.o.valid), sbuf.score.eq(so.score), sbuf.ntok.eq(so.ntok),
                     sbuf.waddr.eq(so_tag.entry), sbuf.gl.eq(so_tag.gl), sbuf.lb.eq(so_tag.lb),
                     smax.valid.eq(score.o.valid), smax.score.eq(so.score), smax.ntok.eq(so.ntok),
                     smax.clear.eq(ctl.start)]
        # the value pass may start: no key beat in the unpack output, the score unit or the M update, as a
        # register (true one cycle after all were empty; no key beat enters after the key pass)
        m.d.sync += v_go_r.eq(~(score.busy | (unpack.o.valid & ~uo_tag.v) | (ui_valid & ~ui_tag.v) | smax.pending))

        # value metadata -> buffer and E. The last metadata word is accepted in cycle t, so E is final in
        # t + expo.latency; the first value word is accepted in t + 1 at the earliest, enters the weight unit
        # in t + 2 (buffer read register) and reaches its stage E_STAGE's logic in t + 1 + E_STAGE
        assert expo.latency <= 1 + W_E_STAGE, "E would not be final when the weight unit reads it"
        # (the write address is gated so that it is not the read address' signal: yosys 0.70 maps a memory whose
        # ports share one address as single-port LUT RAM and fails on it)
        m.d.comb += [vbuf.we.eq(ctl.meta_valid), vbuf.waddr.eq(Mux(ctl.meta_valid, ctl.entry, 0)),
                     vbuf.wdata.eq(data_in.payload),
                     expo.valid.eq(ctl.meta_valid), expo.word.eq(data_in.payload), expo.vlb.eq(ctl.seg_vlb),
                     expo.rem.eq(ctl.rem), expo.clear.eq(ctl.start)]

        # ---- value side: buffer read, lane select, weights -------------------------------------
        rtag_layout = data.StructLayout({"gl": unsigned(f["gl"]), "lb": unsigned(2), "ntok": unsigned(f["ntok"]),
                                         "first": 1})
        r_valid = Signal()
        r_tag = Signal(rtag_layout)
        # the read register stage (buffer data arrives one cycle after the address)
        m.d.sync += [r_valid.eq(ctl.value_valid), r_tag.gl.eq(ctl.gl), r_tag.lb.eq(ctl.lb),
                     r_tag.ntok.eq(ctl.ntok), r_tag.first.eq(ctl.w_first)]
        wp = weight.i.payload
        wtag_in = Signal(wtag_layout)
        m.d.comb += [
            sbuf.raddr.eq(ctl.entry), vbuf.raddr.eq(ctl.entry), sbuf.rgl.eq(r_tag.gl), vbuf.rgl.eq(r_tag.gl),
            weight.i.valid.eq(r_valid),
            wp.score.eq(sbuf.lanes), wp.vmeta.eq(vbuf.lanes), wp.lb.eq(r_tag.lb), wp.ntok.eq(r_tag.ntok),
            wtag_in.first.eq(r_tag.first), wp.tag.eq(wtag_in),
            weight.m.eq(smax.m), weight.e.eq(expo.e),
        ]

        # value words wait W_LATENCY cycles (the weights' latency) before unpacking: W_LATENCY - 1 in the
        # delay line, one in the unpack input register
        vin = delay.i.payload
        m.d.comb += [delay.i.valid.eq(ctl.value_valid), vin.word.eq(data_in.payload), vin.lb.eq(ctl.lb),
                     vin.wi.eq(ctl.wi), vin.ntok.eq(ctl.ntok), vin.half.eq(ctl.half),
                     vin.tag.v.eq(1), vin.tag.clear.eq(ctl.value_clear), vin.tag.vlast.eq(ctl.value_last)]

        # weights + unpacked value codes -> MAC; p and Z sums per head
        wo = weight.o.payload
        wo_tag = Signal(wtag_layout)
        mp = mac.i.payload
        m.d.comb += [
            wo_tag.eq(wo.tag),
            sums.valid.eq(weight.o.valid), sums.first.eq(wo_tag.first), sums.ntok.eq(wo.ntok),
            sums.p.eq(wo.p), sums.z_in.eq(wo.z), sums.clear.eq(ctl.start),
            mac.i.valid.eq(unpack.o.valid & uo_tag.v),
            mp.c16.eq(unpack.o.payload.c16[:NV * HD * 16]), mp.w.eq(wo.w), mp.z.eq(sums.z),
            mp.clear.eq(uo_tag.clear), mp.last.eq(uo_tag.vlast),
        ]

        # ---- output: the G result beats (`head`), every head's statistics and accumulators as they stand ----
        rp = self.result.payload
        m.d.comb += [rp.head.eq(ctl.head), rp.m.eq(smax.m), rp.l.eq(sums.l), rp.e.eq(expo.e),
                     rp.acc.eq(mac.o.payload.acc)]
        return m
