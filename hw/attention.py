"""The whole decode-attention datapath for one KV head and its G query heads (docs/numerics.md 5-7).

One memory port: `data` takes one memory word per cycle, in the order written by
`pmkvq_accel.hw.jobs.job_words`:

  key pass    for each segment, for each group of mpw tokens: 1 key-metadata word, then its key code words
  value meta  for each segment: ceil(n / mpw) value-metadata words (stored on chip; E is computed here)
  value pass  for each segment: its value code words

`job` carries the descriptor (query codes and exponents, segments (count, key width, value width)).
Scores are kept on chip (one buffer entry per mpw tokens) with the run maximum M; the value pass then
computes p, W, Z per token and accumulates W * c16. `result` emits one beat per query head:
(head, M, L, E, acc[head_dim]) = `attention_partial` for that head.
"""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .arith import any_tree, bf16_fields, comb, kept, max_tree, reg, select_update
from .config import BY_CODE, DatapathConfig, by_width
from .score import ScoreUnit
from .softmax import E_STAGE as W_E_STAGE, LATENCY as W_LATENCY, P_BITS, Z_OUT, WeightUnit
from .unpack import Unpack
from .values import ACC_BITS, ValueMac

COUNT_BITS = 17   # tokens per segment: 1 .. 65536


def job_layout(cfg: DatapathConfig):
    return data.StructLayout({
        "q": unsigned(cfg.groups * cfg.head_dim * 16),
        "qexp": unsigned(cfg.groups * 16),
        "nseg": unsigned(5),
        "count": unsigned(cfg.max_segments * COUNT_BITS),
        "klb": unsigned(cfg.max_segments * 2),
        "vlb": unsigned(cfg.max_segments * 2),
    })


def result_layout(cfg: DatapathConfig):
    return data.StructLayout({
        "head": unsigned(3),
        "m": unsigned(32),
        "l": unsigned(64),
        "e": unsigned(16),
        "acc": unsigned(cfg.head_dim * ACC_BITS),
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
        W, HD, G, NJ, MPW, NS = cfg.word_bits, cfg.head_dim, cfg.groups, cfg.nj, cfg.mpw, cfg.max_segments
        m = Module()
        ent_bits = max(1, (cfg.entries - 1).bit_length())
        gl_bits = max(1, (MPW - 1).bit_length()) + 1
        wi_bits = max(1, (cfg.max_wpt - 1).bit_length())
        ntok_bits = NJ.bit_length()

        # ---- descriptor registers ------------------------------------------------------------
        q = Signal(G * HD * 16)
        eq = Signal(G * 16)
        nseg = Signal(5)
        counts = Signal(NS * COUNT_BITS)
        klbs = Signal(NS * 2)
        vlbs = Signal(NS * 2)
        # the current segment's fields without an index multiplexer: cursor copies of count/klb/vlb that
        # shift down by one segment when s advances and reload from the descriptor when s returns to 0,
        # and the current width `lb` as a register (loaded whenever s or the pass changes)
        cur_cnt = Signal(NS * COUNT_BITS)
        cur_klb = Signal(NS * 2)
        cur_vlb = Signal(NS * 2)
        cnt_next = Cat(cur_cnt, Const(0, COUNT_BITS))[COUNT_BITS:2 * COUNT_BITS]    # segment s + 1
        count0 = counts[0:COUNT_BITS]

        # ---- sub-blocks ----------------------------------------------------------------------
        utag_layout = data.StructLayout({
            "kmeta": unsigned(NJ * 32), "first": 1, "last": 1, "sq": 1, "v": 1,
            "entry": unsigned(ent_bits), "gl": unsigned(gl_bits), "lb": unsigned(2),
            "ntok": unsigned(ntok_bits), "clear": 1, "vlast": 1,
        })
        m.submodules.unpack = unpack = Unpack(cfg, tag_width=utag_layout.size)
        stag_layout = data.StructLayout({"entry": unsigned(ent_bits), "gl": unsigned(gl_bits),
                                         "lb": unsigned(2)})
        m.submodules.score = score = ScoreUnit(cfg, tag_width=stag_layout.size)
        wtag_layout = data.StructLayout({"first": 1})
        m.submodules.weight = weight = WeightUnit(cfg, tag_width=wtag_layout.size)
        m.submodules.mac = mac = ValueMac(cfg)
        m.d.comb += [score.o.ready.eq(1), weight.o.ready.eq(1), score.q.eq(q), score.qexp.eq(eq)]

        # ---- memories -------------------------------------------------------------------------
        m.submodules.score_mem = score_mem = Memory(shape=unsigned(MPW * G * 32), depth=cfg.entries, init=[])
        m.submodules.vmeta_mem = vmeta_mem = Memory(shape=unsigned(W), depth=cfg.entries, init=[])
        sw = score_mem.write_port(granularity=G * 32)
        sr = score_mem.read_port()
        vw = vmeta_mem.write_port()
        vr = vmeta_mem.read_port()

        # ---- run state -------------------------------------------------------------------------
        M = [Signal(signed(32), name=f"M_{g}") for g in range(G)]
        L = [Signal(unsigned(64), name=f"L_{g}") for g in range(G)]
        E = Signal(signed(12))

        s = Signal(range(NS + 1))
        rem = Signal(COUNT_BITS)
        gtok = Signal(gl_bits)
        gl = Signal(gl_bits)
        wi = Signal(wi_bits)
        entry = Signal(ent_bits)
        kmeta_reg = Signal(W)
        head = Signal(range(G + 1))
        first_v = Signal()

        lb = Signal(2)         # width of segment s on the current pass (klb in SQ/KMETA/KCODE, vlb in VCODE)
        tpw = comb(m, Array(Const(cfg.tpw(w.bits), gl_bits) for w in BY_CODE)[lb], unsigned(gl_bits), "tpw")
        wpt_m1 = comb(m, Array(Const(cfg.wpt(w.bits) - 1, wi_bits) for w in BY_CODE)[lb], unsigned(wi_bits), "wptm1")
        multi = comb(m, tpw == 0, unsigned(1), "multi")
        gtok_of = lambda r: Mux(r > MPW, MPW, r)   # noqa: E731

        # per-word token bookkeeping (shared by KCODE and VCODE)
        left = Signal(gl_bits)   # gtok - gl, kept as a register: set with gtok, decremented with gl's steps
        ntok = comb(m, Mux(multi, 1, Mux(tpw < left, tpw, left)), unsigned(ntok_bits), "ntok")
        w_first = comb(m, Mux(multi, wi == 0, 1), unsigned(1), "w_first")
        # the group/segment-end flags are kept LUT outputs (arith.kept): they fan out to every controller
        # register, and without the attribute ABC maps those cones as chains of 2-input LUTs
        w_last = kept(m, Mux(multi, wi == wpt_m1, 1), unsigned(1), "w_last")
        gl_step = comb(m, Mux(multi, w_last, tpw), unsigned(gl_bits), "gl_step")
        gl_next = comb(m, gl + gl_step, unsigned(gl_bits + 1), "gl_next")
        # gl_next >= gtok without forming gl_next (gl < gtok inside a group, so left >= 1)
        # this word ends its group, as a register written a cycle ahead (`gd_next_word`, `gd_new_group`;
        # its update follows the FSM below)
        grp_done = Signal()
        # the next word of the same group ends it: multi-word tokens: the next word is the token's last and
        # one token is left; else tokens left after this word (left - tpw) <= tpw
        gd_next_word = comb(m, Mux(multi, ~w_last & (wi + 1 == wpt_m1) & (left == 1), left <= 2 * tpw),
                            unsigned(1), "gd_next")

        def gd_new_group(r, lb_new):
            """A new group of min(r, MPW) tokens at width lb_new is one word: r <= tpw (never for multi-word)."""
            t = Array(Const(cfg.tpw(w.bits), gl_bits) for w in BY_CODE)[lb_new]
            return (t != 0) & (r <= t)
        last_grp = Signal()      # rem == gtok (= rem <= MPW), kept as a register: set with gtok

        # Look-ahead for the next group of the same segment (value groups follow each other without a gap,
        # down to one word per group): the tokens after this group, `rem_after` = max(r - MPW, 0), whether
        # that is <= MPW, `rem_after - MPW`, and whether it is <= 2 MPW, all registers, so that starting the
        # next group only selects between registers (no subtract-compare-select chain in one cycle).
        rem_after = Signal(COUNT_BITS)
        ra_le1 = Signal()
        ra_m1 = Signal(COUNT_BITS)
        ra_le2 = Signal()

        def set_group(r):
            """A group of min(r, MPW) tokens starts with r tokens left in the segment (r a register)."""
            m.d.sync += [gtok.eq(gtok_of(r)), left.eq(gtok_of(r)), last_grp.eq(r <= MPW),
                         ra_le1.eq(r <= 2 * MPW),
                         ra_m1.eq(r - 2 * MPW), ra_le2.eq(r <= 3 * MPW)]

        def next_group():
            """The next group of the same segment: set_group(rem_after) from the look-ahead registers."""
            nxt = Mux(ra_le1, rem_after[0:gl_bits], MPW)
            m.d.sync += [rem.eq(rem_after), gtok.eq(nxt), left.eq(nxt), last_grp.eq(ra_le1),
                         ra_le1.eq(ra_le2),
                         ra_m1.eq(ra_m1 - MPW), ra_le2.eq(rem_after <= 3 * MPW)]
        # s + 1 >= nseg, as a register written with s (IDLE, seg_first, seg_advance): it selects between the
        # candidates of every controller register, so it must not be a compare in the same cycle
        last_seg = Signal()

        kslots = Array(kmeta_reg[i * 32:(i + 1) * 32] for i in range(MPW))
        kmeta_lanes = Cat(*[kslots[gl + j] for j in range(NJ)])

        # unpack input: direct (key pass / S_Q beat) or the delayed value word, through a register stage (the
        # direct beat's token count and lane metadata are logic on the controller's registers); the value
        # words' delay line is one stage shorter for it
        direct_valid = Signal()
        direct_tag = Signal(utag_layout)
        vd_valid = Signal()
        vd_word = Signal(W)
        vd_tag = Signal(utag_layout)
        vd_lb = Signal(2)
        vd_wi = Signal(wi_bits)
        vd_ntok = Signal(ntok_bits)
        ui_valid = Signal()
        up = Signal(unpack.i_layout)
        m.d.sync += [
            ui_valid.eq(direct_valid | vd_valid),
            up.word.eq(Mux(vd_valid, vd_word, Mux(direct_valid, self.data.payload, 0))),
            up.lb.eq(Mux(vd_valid, vd_lb, lb)),
            up.wi.eq(Mux(vd_valid, vd_wi, wi)),
            up.ntok.eq(Mux(vd_valid, vd_ntok, Mux(direct_tag.sq, 0, ntok))),
            up.tag.eq(Mux(vd_valid, vd_tag, direct_tag)),
        ]
        ui_tag = Signal(utag_layout)
        m.d.comb += [unpack.i.valid.eq(ui_valid), unpack.i.payload.eq(up), ui_tag.eq(up.tag)]
        uo_tag = Signal(utag_layout)
        m.d.comb += [uo_tag.eq(unpack.o.payload.tag), unpack.o.ready.eq(1)]

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
        m.d.comb += so_tag.eq(score.o.payload.tag)
        so_ntok = score.o.payload.ntok
        sc = score.o.payload.score
        # lane `lane` takes token j of the word iff gl + j == lane and j < ntok: a decode of gl (kept) and
        # the token flags, so that the 16 enables do not come out of ABC as compares chained through each other
        gl_hot = [kept(m, so_tag.gl == i, unsigned(1), "sw_gl") for i in range(MPW)]
        tok_in = [kept(m, so_ntok > j, unsigned(1), "sw_tok") for j in range(NJ)]
        wdata, wen = [], []
        for lane in range(MPW):
            cands = []
            for w in BY_CODE:
                t = cfg.tpw(w.bits)
                j = lane % t if t >= 1 else 0
                cands.append(sc[j * G * 32:(j + 1) * G * 32])
            wdata.append(Array(cands)[so_tag.lb])
            hits = [tok_in[j] & gl_hot[lane - j] for j in range(min(NJ, lane + 1))]
            # pairs of terms as kept LUTs (the whole OR came out of ABC as a chain of 2-input LUTs)
            hit = Cat(*[kept(m, Cat(*hits[i:i + 2]).any(), unsigned(1), "sw_hit") for i in range(0, len(hits), 2)])
            wen.append(score.o.valid & hit.any())
        m.d.comb += [sw.addr.eq(so_tag.entry), sw.data.eq(Cat(*wdata)), sw.en.eq(Cat(*wen))]

        # ---- value side: buffer read, lane select, weights -------------------------------------
        m.d.comb += [vr.en.eq(1), sr.en.eq(1)]
        rtag_layout = data.StructLayout({"gl": unsigned(gl_bits), "lb": unsigned(2), "ntok": unsigned(ntok_bits),
                                         "first": 1})
        r_valid = Signal()
        r_tag = Signal(rtag_layout)
        s_lanes = Array(sr.data[i * G * 32:(i + 1) * G * 32] for i in range(MPW))
        v_lanes = Array(vr.data[i * 32:(i + 1) * 32] for i in range(MPW))
        wp = weight.i.payload
        wtag_in = Signal(wtag_layout)
        m.d.comb += [
            weight.i.valid.eq(r_valid),
            wp.score.eq(Cat(*[s_lanes[r_tag.gl + j] for j in range(NJ)])),
            wp.vmeta.eq(Cat(*[v_lanes[r_tag.gl + j] for j in range(NJ)])),
            wp.lb.eq(r_tag.lb), wp.ntok.eq(r_tag.ntok),
            wtag_in.first.eq(r_tag.first), wp.tag.eq(wtag_in),
        ]
        m_flat = Cat(*M)
        m.d.comb += [weight.m.eq(m_flat), weight.e.eq(E)]

        # value words wait W_LATENCY cycles (the weights' latency) before unpacking: W_LATENCY - 1 here, one
        # in the unpack input register
        dl_layout = data.StructLayout({"word": unsigned(W), "lb": unsigned(2), "wi": unsigned(wi_bits),
                                       "ntok": unsigned(ntok_bits), "tag": utag_layout})
        v_in_valid = Signal()
        v_in = Signal(dl_layout)
        dv, dp = v_in_valid, v_in
        for k in range(W_LATENCY - 1):
            nv, np_ = Signal(name=f"dly_v{k}"), Signal(dl_layout, name=f"dly_p{k}")
            m.d.sync += [nv.eq(dv), np_.eq(dp)]
            dv, dp = nv, np_
        m.d.comb += [vd_valid.eq(dv), vd_word.eq(dp.word), vd_lb.eq(dp.lb), vd_wi.eq(dp.wi),
                     vd_ntok.eq(dp.ntok), vd_tag.eq(dp.tag)]

        # weights + unpacked value codes -> MAC; p and Z sums per head
        wo = weight.o.payload
        L_parts = {}
        wo_tag = Signal(wtag_layout)
        m.d.comb += wo_tag.eq(wo.tag)
        mp = mac.i.payload
        m.d.comb += [
            mac.i.valid.eq(unpack.o.valid & uo_tag.v),
            mp.c16.eq(unpack.o.payload.c16), mp.w.eq(wo.w), mp.clear.eq(uo_tag.clear), mp.last.eq(uo_tag.vlast),
        ]
        # p and Z count once per token (its first word) and only for the word's tokens: Z goes to the MAC
        # (subtracted in its chains), p is summed per word (registered) and then into L
        zl = []
        for j in range(NJ):
            ok = kept(m, weight.o.valid & wo_tag.first & (wo.ntok > j), unsigned(1), "pz_ok")
            for g in range(G):
                zl.append(Mux(ok, wo.z[(j * G + g) * Z_OUT:(j * G + g + 1) * Z_OUT], 0))
                L_parts.setdefault(g, []).append(Mux(ok, wo.p[(j * G + g) * P_BITS:(j * G + g + 1) * P_BITS], 0))
        m.d.comb += mp.z.eq(Cat(*zl))
        for g in range(G):
            psum = reg(m, 1, sum(L_parts[g]), unsigned(P_BITS + 3), name="psum")
            m.d.sync += L[g].eq(L[g] + psum)

        # running max over the scores written: the word's maximum (a tree, registered), then M = max(M, it)
        m_pend = Signal()        # a word maximum not yet folded into M (the value pass waits for it)
        m_pend1 = reg(m, 1, score.o.valid, name="m_pend1")
        m.d.sync += m_pend.eq(m_pend1 | score.o.valid)
        # the value pass may start: no key beat in the unpack output, the score unit or the M update, as a
        # register (true one cycle after all were empty; no key beat enters after the key pass)
        v_go_r = Signal()
        m.d.sync += v_go_r.eq(~(score.busy | (unpack.o.valid & ~uo_tag.v) | (ui_valid & ~ui_tag.v) | m_pend))
        for g in range(G):
            cands = []
            for j in range(NJ):
                v = sc[(j * G + g) * 32:(j * G + g + 1) * 32].as_signed()
                ok = score.o.valid & (so_ntok > j)
                cands.append(reg(m, 1, Mux(ok, v, -(1 << 31)), signed(32), name="wlane", init=-(1 << 31)))
            wmax = reg(m, 1, max_tree(m, cands), signed(32), name="wmax", init=-(1 << 31))
            m.d.sync += M[g].eq(Mux(wmax > M[g], wmax, M[g]))

        # E from the value metadata words
        e_lanes = []
        e_vlb = comb(m, cur_vlb[0:2], unsigned(2), "e_vlb")
        e_bits = comb(m, by_width(e_vlb, lambda w: w.bits), unsigned(5), "e_bits")
        # lane t holds a token of this segment iff t < rem (t < MPW): the high bits of rem or a 4-bit compare
        rem_hi = any_tree(m, rem[(MPW - 1).bit_length():], name="rem_hi")
        rem_lo = rem[0:(MPW - 1).bit_length()]
        # the lane masks drive the lane registers' reset pins. `t < rem_lo` is the carry out of
        # rem_lo + (MPW - 1 - t): a carry chain is a box to the LUT mapper, whereas 16 compares of the same
        # 4 bits came out of ABC as one chain of LUTs through each other (7 levels)
        vmeta_accept = Signal(attrs={"keep": 1})
        for t in range(MPW):
            word = self.data.payload
            _, xs = bf16_fields(m, word[t * 32:t * 32 + 16])
            _, xz = bf16_fields(m, word[t * 32 + 16:t * 32 + 32])
            xsb = comb(m, xs + e_bits, signed(12), "xsb")
            et = comb(m, Mux(xsb > xz, xsb, xz), signed(12), "et")
            gt = comb(m, rem_lo + (MPW - 1 - t), unsigned(len(rem_lo) + 1), "el_gt")
            lane_ok = kept(m, vmeta_accept & (rem_hi | gt[-1]), unsigned(1), "el_ok")
            e_lanes.append(reg(m, 1, Mux(lane_ok, et, -2048), signed(12), name="el",
                               init=-2048))
        # E = max(E, the word's lanes): a tree of pairwise maxima, two levels per register stage (timing below).
        # The tree's registers start empty (-2048).
        em = e_lanes
        e_regs = 1                                   # the lane registers
        while len(em) > 1:
            em = [reg(m, 1, max_tree(m, em[i:i + 4]), signed(12), name="em", init=-2048)   # -2048: empty
                  for i in range(0, len(em), 4)]
            e_regs += 1
        e_regs += 1                                  # E itself
        # the last metadata word is accepted in cycle t, so E is final in cycle t + e_regs; the first value word
        # is accepted in t + 1 at the earliest, enters the weight unit in t + 2 (buffer read register) and
        # reaches its stage E_STAGE's logic in t + 1 + E_STAGE
        assert e_regs <= 1 + W_E_STAGE, "E would not be final when the weight unit reads it"
        e_clear = Signal()
        with m.If(e_clear):
            m.d.sync += E.eq(-2048)
        with m.Else():
            m.d.sync += E.eq(Mux(em[0] > E, em[0], E))

        # ---- output -----------------------------------------------------------------------------
        acc_flat = mac.o.payload.acc
        g_acc = Array(acc_flat[g * HD * ACC_BITS:(g + 1) * HD * ACC_BITS] for g in range(G))[head]
        rp = self.result.payload
        m.d.comb += [
            rp.head.eq(head), rp.m.eq(Array(M)[head]), rp.l.eq(Array(L)[head]), rp.e.eq(E),
            rp.acc.eq(g_acc),
        ]

        # ---- controller -------------------------------------------------------------------------
        def seg_first():
            """s returns to 0: the cursors reload from the descriptor."""
            m.d.sync += [s.eq(0), last_seg.eq(nseg <= 1), rem.eq(count0), cur_cnt.eq(counts), cur_klb.eq(klbs),
                         cur_vlb.eq(vlbs)]

        def seg_advance(value_pass):
            """s advances by one: the cursors shift down by one segment; lb = the next segment's width."""
            nxt_lb = (cur_vlb if value_pass else cur_klb)[2:4] if NS > 1 else Const(0, 2)
            m.d.sync += [s.eq(s + 1), last_seg.eq(s + 2 >= nseg), rem.eq(cnt_next), lb.eq(nxt_lb),
                         cur_cnt.eq(cur_cnt >> COUNT_BITS), cur_klb.eq(cur_klb >> 2), cur_vlb.eq(cur_vlb >> 2)]

        # the controller's decisions as kept LUT outputs, each a small function of registers, so that the
        # next-state logic of every register selects between candidates with them (ABC otherwise maps the
        # nested conditions as a chain of 2-input LUTs)
        pass_end = kept(m, grp_done & last_grp & last_seg, unsigned(1), "pass_end")    # the pass's last word
        seg_next = kept(m, grp_done & last_grp & ~last_seg, unsigned(1), "seg_next")
        rem_le = kept(m, rem <= MPW, unsigned(1), "rem_le")
        vm_last = kept(m, rem_le & last_seg, unsigned(1), "vm_last")    # VMETA: the last metadata word
        vm_seg = kept(m, rem_le & ~last_seg, unsigned(1), "vm_seg")     # VMETA: a segment's last word

        v_accept = kept(m, self.data.valid & v_go_r, unsigned(1), "v_accept")   # a value word, in VCODE
        # "the state is KCODE" / "VCODE" as registers written with the state (`go`): the events below then
        # start from registers, not from decodes of the state, which ABC chained
        in_k, in_v = Signal(), Signal()

        def go(state):
            m.next = state
            m.d.sync += [in_k.eq(state == "KCODE"), in_v.eq(state == "VCODE")]

        def end_of_group(group_state, after_last, value_pass):
            """Book-keeping at the end of a group: next group, next segment or the next phase."""
            m.d.sync += [entry.eq(entry + 1), gl.eq(0), wi.eq(0)]
            with m.If(pass_end | seg_next):
                with m.If(pass_end):
                    seg_first()
                    m.d.sync += entry.eq(0)
                    set_group(count0)      # (the next pass sets its group again)
                    go(after_last)
                with m.Else():
                    seg_advance(value_pass)
                    set_group(cnt_next)
                    go(group_state)
            with m.Else():
                next_group()
                go(group_state)

        m.d.comb += [direct_tag.gl.eq(gl), direct_tag.entry.eq(entry), direct_tag.lb.eq(lb),
                     direct_tag.ntok.eq(ntok), direct_tag.first.eq(w_first), direct_tag.last.eq(w_last),
                     direct_tag.kmeta.eq(kmeta_lanes)]

        with m.FSM(name="ctl") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.job.ready.eq(1)
                with m.If(self.job.valid):
                    jp = self.job.payload
                    m.d.sync += [q.eq(jp.q), eq.eq(jp.qexp), nseg.eq(jp.nseg), counts.eq(jp.count),
                                 klbs.eq(jp.klb), vlbs.eq(jp.vlb), s.eq(0), last_seg.eq(jp.nseg <= 1),
                                 rem.eq(jp.count[0:COUNT_BITS]), entry.eq(0), gl.eq(0), wi.eq(0),
                                 first_v.eq(1), head.eq(0), cur_cnt.eq(jp.count), cur_klb.eq(jp.klb),
                                 cur_vlb.eq(jp.vlb), lb.eq(jp.klb[0:2])]
                    m.d.sync += [M[g].eq(-(1 << 31)) for g in range(G)]
                    m.d.sync += [L[g].eq(0) for g in range(G)]
                    m.d.comb += e_clear.eq(1)
                    go("SQ")
            with m.State("SQ"):
                m.d.comb += [direct_valid.eq(1), direct_tag.sq.eq(1)]
                go("KMETA")
            with m.State("KMETA"):
                m.d.comb += self.data.ready.eq(1)
                with m.If(self.data.valid):
                    m.d.sync += [kmeta_reg.eq(self.data.payload), gl.eq(0), wi.eq(0)]
                    set_group(rem)
                    go("KCODE")
            with m.State("KCODE"):
                m.d.comb += [self.data.ready.eq(1), direct_valid.eq(self.data.valid)]
                with m.If(self.data.valid):
                    with m.If(grp_done):
                        end_of_group("KMETA", "VMETA", False)
                    with m.Else():
                        m.d.sync += [gl.eq(gl_next), wi.eq(Mux(w_last, 0, wi + 1)), left.eq(left - gl_step)]
            with m.State("VMETA"):
                m.d.comb += [self.data.ready.eq(1), vmeta_accept.eq(self.data.valid),
                             vw.addr.eq(entry), vw.data.eq(self.data.payload), vw.en.eq(self.data.valid)]
                with m.If(self.data.valid):
                    m.d.sync += entry.eq(entry + 1)
                    with m.If(vm_last | vm_seg):
                        with m.If(vm_last):
                            seg_first()
                            m.d.sync += [entry.eq(0), gl.eq(0), wi.eq(0), lb.eq(vlbs[0:2])]
                            set_group(count0)
                            go("VCODE")
                        with m.Else():
                            seg_advance(True)
                    with m.Else():
                        m.d.sync += rem.eq(rem - MPW)
            with m.State("VCODE"):
                # The first value word waits only while key scores are still in flight (short runs):
                # once the score unit is empty and the last word maximum is folded in, M and the score
                # buffer are final. E is needed four stages into the weight pipeline (softmax.E_STAGE), by
                # when the last metadata word has been folded in (`e_regs` stages after it, asserted above).
                v_go = v_go_r
                m.d.comb += self.data.ready.eq(v_go)
                m.d.comb += [
                    sr.addr.eq(entry), vr.addr.eq(entry),
                    v_in_valid.eq(self.data.valid & v_go),
                    v_in.word.eq(self.data.payload), v_in.lb.eq(lb), v_in.wi.eq(wi), v_in.ntok.eq(ntok),
                    v_in.tag.v.eq(1), v_in.tag.clear.eq(first_v), v_in.tag.vlast.eq(pass_end),
                ]
                with m.If(v_accept):
                    m.d.sync += first_v.eq(0)
                    with m.If(grp_done):
                        end_of_group("VCODE", "DRAIN", True)
                    with m.Else():
                        m.d.sync += [gl.eq(gl_next), wi.eq(Mux(w_last, 0, wi + 1)), left.eq(left - gl_step)]
            with m.State("DRAIN"):
                # results go out as soon as the accumulators are final (L settles earlier)
                m.d.comb += self.result.valid.eq(mac.o.valid)
                with m.If(mac.o.valid & self.result.ready):
                    m.d.sync += head.eq(head + 1)
                    with m.If(head == G - 1):
                        m.d.comb += mac.o.ready.eq(1)
                        go("IDLE")

        # grp_done's and rem_after's updates: one value per controller event, as kept AND-ORs
        # (arith.select_update); the events kept once, one layer on registers and the decisions above
        valid = self.data.valid
        code_acc = (in_k & valid) | (in_v & v_accept)
        ev = {name: kept(m, e, unsigned(1), "ev_" + name) for name, e in (
            ("kmeta", fsm.ongoing("KMETA") & valid),            # a key group starts
            ("word", code_acc & ~grp_done),                     # a word inside its group
            ("grp", code_acc & grp_done & ~last_grp),           # a group ends, the segment goes on
            ("kseg", in_k & valid & seg_next),                  # a segment ends, another follows
            ("vseg", in_v & v_accept & seg_next),
            ("end", code_acc & pass_end),                       # a pass ends
            ("vm_last", fsm.ongoing("VMETA") & valid & vm_last),   # the value pass starts
        )}
        seg_lb = lambda cur: cur[2:4] if NS > 1 else Const(0, 2)    # noqa: E731  (the next segment's width)
        select_update(m, grp_done, [
            (ev["kmeta"], gd_new_group(rem, lb)), (ev["word"], gd_next_word),
            (ev["grp"], gd_new_group(rem_after, lb)),
            (ev["kseg"], gd_new_group(cnt_next, seg_lb(cur_klb))),
            (ev["vseg"], gd_new_group(cnt_next, seg_lb(cur_vlb))),
            (ev["end"], gd_new_group(count0, lb)), (ev["vm_last"], gd_new_group(count0, vlbs[0:2])),
        ], "gd")
        after = lambda r: Mux(r <= MPW, 0, r - MPW)        # noqa: E731  (rem_after of a group of r tokens)
        select_update(m, rem_after, [
            (ev["kmeta"], after(rem)), (ev["grp"], Mux(ra_le1, 0, ra_m1)), (ev["kseg"], after(cnt_next)),
            (ev["vseg"], after(cnt_next)), (ev["end"], after(count0)), (ev["vm_last"], after(count0)),
        ], "ra")

        # value-side read register stage (buffer data arrives one cycle after the address)
        m.d.sync += [r_valid.eq(v_in_valid), r_tag.gl.eq(gl), r_tag.lb.eq(lb), r_tag.ntok.eq(ntok),
                     r_tag.first.eq(w_first)]
        return m
