"""The datapath's controller: walks one job's words (hw/attention.py's word order) and says what each is.

It holds the job descriptor, the current segment (cursor copies of its count and widths) and the current
group of mpw tokens, and for every word it accepts says: a key word for the unpacker (`key_valid`, with the
S_Q beat first), a value-metadata word for the buffer and E (`meta_valid`), or a value word for the delay
line (`value_valid`), with the word's fields (`gl`, `entry`, `lb`, `wi`, `ntok`, `w_first`, `w_last`, the key
metadata lanes). After the value pass it hands out the G result beats (`head`, `result_valid`).

Value words that hold more tokens than the value pass has slots (2-bit codes, `cfg.value_halves`) are two
beats: the word stays on the port (`word_ready` low) for its first half, `half` says which half a beat is, and
the token fields (`gl`, `ntok`) count `cfg.value_tpw` tokens per beat; a word whose tokens fit in one half (the
end of a group) is one beat.

Timing: every decision that fans out to the controller's registers is a register or a kept LUT output of
registers (`arith.kept`, `arith.select_update`), so the next-state logic only selects between candidates
(docs/hardware.md, "LUT levels").
"""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import comb, kept, select_update
from .config import BY_CODE, DatapathConfig

COUNT_BITS = 17   # tokens per segment: 1 .. 65536


def job_layout(cfg: DatapathConfig):
    """The job descriptor: G x head_dim query codes and G exponents (16 bits each), the segment count, and
    per segment its token count and key / value width codes (hw/jobs.py packs it)."""
    return data.StructLayout({
        "q": unsigned(cfg.groups * cfg.head_dim * 16),
        "qexp": unsigned(cfg.groups * 16),
        "nseg": unsigned(5),
        "count": unsigned(cfg.max_segments * COUNT_BITS),
        "klb": unsigned(cfg.max_segments * 2),
        "vlb": unsigned(cfg.max_segments * 2),
    })


class JobController(wiring.Component):
    def __init__(self, cfg: DatapathConfig):
        if not isinstance(cfg, DatapathConfig):
            raise TypeError(f"JobController needs a DatapathConfig, got {cfg!r}")
        self.cfg = cfg
        f = cfg.field_bits
        G, HD, NJ = cfg.groups, cfg.head_dim, cfg.nj
        super().__init__({
            "job": In(stream.Signature(job_layout(cfg))),
            "word_valid": In(1), "word": In(cfg.word_bits), "word_ready": Out(1),
            "v_go": In(1),               # the value pass may start (no key beat in flight, M final)
            "mac_valid": In(1),          # the accumulators are final
            "result_ready": In(1),
            "q": Out(G * HD * 16), "qexp": Out(G * 16),   # the descriptor's query
            "start": Out(1),             # a job is accepted: the run statistics clear
            "key_valid": Out(1), "sq": Out(1),            # a key beat (the S_Q beat has sq set, no word)
            "meta_valid": Out(1),        # a value-metadata word is accepted (written at `entry`)
            "value_valid": Out(1), "value_clear": Out(1), "value_last": Out(1),   # a value word
            # the current word's fields
            "entry": Out(f["entry"]), "gl": Out(f["gl"]), "lb": Out(2), "wi": Out(f["wi"]),
            "ntok": Out(f["ntok"]), "w_first": Out(1), "w_last": Out(1), "kmeta": Out(NJ * 32),
            "half": Out(1),              # a value beat is the upper half of its word (value_halves)
            "seg_vlb": Out(2),           # the current segment's value width (the E lanes' b)
            "rem": Out(COUNT_BITS),      # tokens of the segment from this group on
            "head": Out(range(G + 1)), "result_valid": Out(1), "mac_ready": Out(1),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        G, NJ, MPW, NS = cfg.groups, cfg.nj, cfg.mpw, cfg.max_segments
        f = cfg.field_bits
        gl_bits, wi_bits = f["gl"], f["wi"]
        m = Module()

        # ---- descriptor registers ------------------------------------------------------------
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
        m.d.comb += self.seg_vlb.eq(cur_vlb[0:2])

        # ---- run position -----------------------------------------------------------------------
        s = Signal(range(NS + 1))
        rem = self.rem
        gtok = Signal(gl_bits)
        gl = self.gl
        wi = self.wi
        entry = self.entry
        kmeta_reg = Signal(cfg.word_bits)
        head = self.head
        first_v = Signal()

        lb = self.lb           # width of segment s on the current pass (klb in SQ/KMETA/KCODE, vlb in VCODE)
        # "the state is KCODE" / "VCODE" as registers written with the state (`go`): the events below then
        # start from registers, not from decodes of the state, which ABC chained
        in_k, in_v = Signal(), Signal()

        def tpw_of(value_pass, bits):
            """Tokens per beat: per word on the key pass, per value beat (half word or word) on the value pass."""
            return cfg.value_tpw(bits) if value_pass else cfg.tpw(bits)
        tpw = comb(m, Array(Const(tpw_of(vp, w.bits), gl_bits) for vp in (False, True) for w in BY_CODE)[Cat(lb, in_v)],
                   unsigned(gl_bits), "tpw")
        wpt_m1 = comb(m, Array(Const(cfg.wpt(w.bits) - 1, wi_bits) for w in BY_CODE)[lb], unsigned(wi_bits), "wptm1")
        multi = comb(m, tpw == 0, unsigned(1), "multi")
        gtok_of = lambda r: Mux(r > MPW, MPW, r)   # noqa: E731

        # per-word token bookkeeping (shared by KCODE and VCODE)
        left = Signal(gl_bits)   # gtok - gl, kept as a register: set with gtok, decremented with gl's steps
        ntok = comb(m, Mux(multi, 1, Mux(tpw < left, tpw, left)), unsigned(f["ntok"]), "ntok")
        w_first = comb(m, Mux(multi, wi == 0, 1), unsigned(1), "w_first")
        # the group/segment-end flags are kept LUT outputs (arith.kept): they fan out to every controller
        # register, and without the attribute ABC maps those cones as chains of 2-input LUTs
        w_last = kept(m, Mux(multi, wi == wpt_m1, 1), unsigned(1), "w_last")
        m.d.comb += [self.ntok.eq(ntok), self.w_first.eq(w_first), self.w_last.eq(w_last)]
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

        def gd_new_group(r, lb_new, value_pass):
            """A new group of min(r, MPW) tokens at width lb_new is one beat: r <= tpw (never for multi-word)."""
            t = Array(Const(tpw_of(value_pass, w.bits), gl_bits) for w in BY_CODE)[lb_new]
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
        m.d.comb += self.kmeta.eq(Cat(*[kslots[gl + j] for j in range(NJ)]))

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

        valid = self.word_valid
        v_accept = kept(m, valid & self.v_go, unsigned(1), "v_accept")   # a value beat, in VCODE
        # two-beat value words: `half` is set after a word's first beat and cleared by its second (or a group end)
        half = self.half
        if any(cfg.value_halves(w.bits) == 2 for w in BY_CODE):
            split = comb(m, Array(Const(cfg.value_halves(w.bits) == 2, 1) for w in BY_CODE)[lb], unsigned(1), "split")
        else:
            split = Const(0, 1)

        def go(state):
            m.next = state
            m.d.sync += [in_k.eq(state == "KCODE"), in_v.eq(state == "VCODE")]

        def end_of_group(group_state, after_last, value_pass):
            """Book-keeping at the end of a group: next group, next segment or the next phase."""
            m.d.sync += [entry.eq(entry + 1), gl.eq(0), wi.eq(0), half.eq(0)]
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

        def next_word(value_pass=False):
            m.d.sync += [gl.eq(gl_next), wi.eq(Mux(w_last, 0, wi + 1)), left.eq(left - gl_step)]
            if value_pass:
                m.d.sync += half.eq(split & ~half)

        m.d.comb += [self.value_clear.eq(first_v), self.value_last.eq(pass_end)]

        with m.FSM(name="ctl") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.job.ready.eq(1)
                with m.If(self.job.valid):
                    jp = self.job.payload
                    m.d.sync += [self.q.eq(jp.q), self.qexp.eq(jp.qexp), nseg.eq(jp.nseg), counts.eq(jp.count),
                                 klbs.eq(jp.klb), vlbs.eq(jp.vlb), s.eq(0), last_seg.eq(jp.nseg <= 1),
                                 rem.eq(jp.count[0:COUNT_BITS]), entry.eq(0), gl.eq(0), wi.eq(0),
                                 first_v.eq(1), head.eq(0), half.eq(0), cur_cnt.eq(jp.count), cur_klb.eq(jp.klb),
                                 cur_vlb.eq(jp.vlb), lb.eq(jp.klb[0:2])]
                    m.d.comb += self.start.eq(1)
                    go("SQ")
            with m.State("SQ"):
                m.d.comb += [self.key_valid.eq(1), self.sq.eq(1)]
                go("KMETA")
            with m.State("KMETA"):
                m.d.comb += self.word_ready.eq(1)
                with m.If(valid):
                    m.d.sync += [kmeta_reg.eq(self.word), gl.eq(0), wi.eq(0)]
                    set_group(rem)
                    go("KCODE")
            with m.State("KCODE"):
                m.d.comb += [self.word_ready.eq(1), self.key_valid.eq(valid)]
                with m.If(valid):
                    with m.If(grp_done):
                        end_of_group("KMETA", "VMETA", False)
                    with m.Else():
                        next_word()
            with m.State("VMETA"):
                m.d.comb += [self.word_ready.eq(1), self.meta_valid.eq(valid)]
                with m.If(valid):
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
                # the first value word waits for `v_go` (key scores still in flight in short runs); E is
                # final by the time the weight unit reads it (asserted in hw/attention.py)
                # a two-beat word is taken with its second beat (or with a group's last beat)
                m.d.comb += [self.word_ready.eq(self.v_go & (~split | half | grp_done)),
                             self.value_valid.eq(valid & self.v_go)]
                with m.If(v_accept):
                    m.d.sync += first_v.eq(0)
                    with m.If(grp_done):
                        end_of_group("VCODE", "DRAIN", True)
                    with m.Else():
                        next_word(value_pass=True)
            with m.State("DRAIN"):
                # results go out as soon as the accumulators are final (L settles earlier)
                m.d.comb += self.result_valid.eq(self.mac_valid)
                with m.If(self.mac_valid & self.result_ready):
                    m.d.sync += head.eq(head + 1)
                    with m.If(head == G - 1):
                        m.d.comb += self.mac_ready.eq(1)
                        go("IDLE")

        # grp_done's and rem_after's updates: one value per controller event, as kept AND-ORs
        # (arith.select_update); the events kept once, one layer on registers and the decisions above
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
            (ev["kmeta"], gd_new_group(rem, lb, False)), (ev["word"], gd_next_word),
            (ev["grp"], Mux(in_v, gd_new_group(rem_after, lb, True), gd_new_group(rem_after, lb, False))),
            (ev["kseg"], gd_new_group(cnt_next, seg_lb(cur_klb), False)),
            (ev["vseg"], gd_new_group(cnt_next, seg_lb(cur_vlb), True)),
            (ev["end"], gd_new_group(count0, lb, False)), (ev["vm_last"], gd_new_group(count0, vlbs[0:2], True)),
        ], "gd")
        after = lambda r: Mux(r <= MPW, 0, r - MPW)        # noqa: E731  (rem_after of a group of r tokens)
        select_update(m, rem_after, [
            (ev["kmeta"], after(rem)), (ev["grp"], Mux(ra_le1, 0, ra_m1)), (ev["kseg"], after(cnt_next)),
            (ev["vseg"], after(cnt_next)), (ev["end"], after(count0)), (ev["vm_last"], after(count0)),
        ], "ra")
        return m
