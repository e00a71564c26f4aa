"""Scores (key pass): integer dot products of the G query heads with the key codes of up to `nj`
tokens per word, then the per-token (scale, zero) correction (docs/numerics.md section 5).

    D_t   = sum_d Q_d * c_td                 (c16 lanes: D = (sum_d Q_d * c16_td) >> (16 - b), exact)
    T1    = sat_62(rshr(ms * D_t, -(xs + eq + 16)))      (TERM_LIMIT_BITS from model/formats.py)
    T2    = sat_62(rshr(mz * S_Q, -(xz + eq + 16)))
    score = sat_31(T1 - T2)

The dot products are systolic multiply-add chains of CHAIN products (the DSP48 cascade form: one DSP per
product, the sum passed along the chain; lane d enters d % CHAIN cycles late) and small adder trees over
the head_dim/CHAIN chains. With nj >= 2 token slots, one DSP serves two slots: only 2-bit codes reach the
slots j >= nj/2 and only codes of <= 4 bits the slots 1..nj/2-1, so slot j (low bits) and slot j + nj/2
(bits LANE..) share the code operand of one 16 x 26 multiply and the 48-bit chain carries both sums
(`_packed`; the lanes are separated after the chain, exactly). S_Q = sum_d Q_d is computed by the same chains: a beat with `sq` set (and all
lanes zero) feeds ones into slot 0 and latches the result; send it once after loading a new query.
Tokens that span several words (`first`/`last`) accumulate their partial dot products.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from pmkvq_accel.model.formats import BF16_EXP_BIAS, BF16_SUBNORMAL_EXP, SCORE_BITS, SCORE_FRAC, TERM_LIMIT_BITS

from .arith import any_tree, bf16_fields, comb, delay, reg, saturate, shift_round_sat_by, shift_sat_ctl, tree_sum
from .config import BY_CODE, DatapathConfig, WidthCode, by_width, wide_code
from .dsp import P_BITS
from .macarray import CHAIN, SCORE_A_BITS, UnitOnArray, element, geometry

LANE = 24    # bit offset of the upper lane of a packed DSP operand (the lower lane's chain sum is < 2^23)
# D of the slots >= 1 (codes of <= 4 bits): |D| <= 128 * 32767 * 15 < 2^26, so ms * D is one 27 x 18 multiply
NARROW_D_BITS = 27
WIDE_D_BITS = 40     # D of slot 0 (8/16-bit codes, multi-word tokens accumulated)
MANT_BITS = 9        # a bf16 mantissa, signed (arith.bf16_fields)


def d_bits(slot: int) -> int:
    """The width of D (signed) in token slot `slot`; ms * D then fits d_bits + MANT_BITS bits, the width of
    T1's product and of its shift (narrower for the narrow slots: fewer bits to shift and test)."""
    return WIDE_D_BITS if slot == 0 else NARROW_D_BITS


class ScoreUnit(wiring.Component):
    def __init__(self, cfg: DatapathConfig, tag_width: int = 1):
        if not isinstance(cfg, DatapathConfig):
            raise TypeError(f"ScoreUnit needs a DatapathConfig, got {cfg!r}")
        self.cfg = cfg
        nj, hd, g = cfg.nj, cfg.head_dim, cfg.groups
        self.i_layout = data.StructLayout({
            "c16": unsigned(nj * hd * 16),
            "kmeta": unsigned(nj * 32),
            "lb": unsigned(2),
            "ntok": unsigned(cfg.field_bits["ntok"]),
            "first": 1, "last": 1, "sq": 1,
            "tag": unsigned(tag_width),
        })
        self.o_layout = data.StructLayout({
            "score": unsigned(nj * g * 32),
            "ntok": unsigned(cfg.field_bits["ntok"]),
            "tag": unsigned(tag_width),
        })
        self.block_members = {
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
            "q": In(g * hd * 16),       # query codes, signed 16-bit, index g*head_dim + d
            "qexp": In(g * 16),         # query exponents, signed 16-bit
            "busy": Out(1),             # a beat is inside the pipeline
        }
        npair, _chain, nchain = geometry(cfg)
        super().__init__({
            **self.block_members,
            # the dot products run on the shared multiply array (hw/macarray.py): operands out, sums in
            "arr_a": Out(npair * hd * SCORE_A_BITS),
            "arr_q": Out(g * hd * 16),
            "arr_ce": Out(1),
            "arr_sum": In(g * npair * nchain * P_BITS),
        })

    def _packed(self, m, p, k, d, wide):
        """The code operand of the DSP for (slot pair k, dimension d) as one unsigned 26-bit value.

        nj == 1: the 16-bit lane. Otherwise the lower lane is slot k as c16 >> 12 (a 4-bit code, or 4 c for a
        2-bit code; slot 0 carries the whole 16-bit lane for 8/16-bit codes and the S_Q beat, `wide`) and the
        upper lane, at bit LANE, is slot k + nj/2 as c16 >> 14: only 2-bit codes reach slots >= nj/2
        (cfg.tpw(4) = nj/2). With Q in [-32767, 32767] and CHAIN = 16 the lower lane's chain sum is below
        16 * 32767 * 15 < 2^23 and the upper one below 2^21, so the 48-bit chain holds both lanes exactly:
        lower = the low LANE bits (signed), upper = (P >> LANE) + bit LANE-1 of P."""
        nj, hd = self.cfg.nj, self.cfg.head_dim
        lane = lambda j: p.c16[(j * hd + d) * 16:(j * hd + d + 1) * 16]
        if nj == 1:
            return lane(0) | p.sq                   # the S_Q beat: ones in slot 0
        assert LANE >= (CHAIN * 32767 * 15).bit_length() + 1     # the lower lane fits, signed
        assert LANE + 2 == SCORE_A_BITS
        lo, hi = lane(k), lane(k + nj // 2)[14:16]
        if k == 0:
            lo = lo | p.sq                          # the S_Q beat: ones in slot 0
            # wide: the lane as it is; narrow: its top nibble in bits 0..3 (bits 0..11 of a 2/4-bit c16 are zero)
            low4 = Mux(wide, lo[0:4], lo[12:16])
            lo = Cat(low4, lo[4:12], Mux(wide, lo[12:16], 0))
            hi = Mux(wide, 0, hi)
        else:
            lo = lo[12:16]
        return comb(m, Cat(lo, Const(0, LANE - len(lo)), hi), unsigned(LANE + 2), "ckp")

    def elaborate(self, platform):
        cfg = self.cfg
        nj, hd, G = cfg.nj, cfg.head_dim, cfg.groups
        m = Module()
        adv = Signal()
        m.d.comb += [adv.eq(~self.o.valid | self.o.ready), self.i.ready.eq(adv)]
        p = self.i.payload
        valids = []

        # dot products: per head, head_dim/CHAIN systolic multiply-add chains (DSP48 cascades; lane d is skewed
        # by d % CHAIN cycles, shared by the G heads), then small adder trees over the chains. With nj >= 2
        # token slots, two slots share one DSP per (head, dimension): the query code on one port, the codes of
        # slot j (lower lane, bits 0..) and slot j + nj/2 (upper lane, bits LANE..) on the other (`_packed`).
        v1 = reg(m, adv, self.i.valid, name="v1")
        valids.append(v1)
        ctl_fields = Cat(p.kmeta, p.lb, p.ntok, p.first, p.last, p.sq, p.tag)
        ctl1 = reg(m, adv, ctl_fields, name="ctl1")
        npair, chain, nchain = geometry(cfg)
        wide = wide_code(p.lb) | p.sq          # 8/16-bit codes (slot 0 only) or the S_Q beat
        for k in range(npair):
            for d in range(hd):
                code = delay(m, adv, self._packed(m, p, k, d, wide), d % chain, name="ck")
                m.d.comb += element(self.arr_a, k * hd + d, SCORE_A_BITS).eq(code)
        m.d.comb += [self.arr_q.eq(self.q), self.arr_ce.eq(adv)]
        clat = chain + 1          # a cascade's sum, lane d entering d % chain cycles late, `clat` after the beat
        # one lane (nj = 1): |Q c16| < 2^31 over `chain` products; the sum's bits above are its sign
        full_bits = 33 + (chain - 1).bit_length()
        sums = {}
        lat = 0
        for gi in range(G):
            for k in range(npair):
                full, lo, hi = [], [], []
                for ci in range(nchain):
                    part = element(self.arr_sum, (gi * npair + k) * nchain + ci, P_BITS).as_signed()
                    if nj == 1:
                        full.append(part[0:full_bits].as_signed())
                        continue
                    if k == 0:
                        full.append(part)
                    # lower lane: the low LANE bits, signed; upper lane: the rest, plus the lower lane's borrow
                    lo.append(comb(m, part[0:LANE].as_signed(), signed(LANE), "dlo"))
                    hi.append(comb(m, (part >> LANE) + part[LANE - 1], signed(48 - LANE + 1), "dhi"))
                if full:
                    sums[gi, 0, "full"], tlat = tree_sum(m, adv, full, 2, "dt")
                if lo:
                    sums[gi, k, "lo"], tlat = tree_sum(m, adv, lo, 2, "dl")
                    sums[gi, k + npair, "hi"], tlat = tree_sum(m, adv, hi, 2, "dh")
                lat = clat - 1 + tlat      # registers after ctl1
        # the scale/zero exponents as -(x + 16) and -(x + 16) - 1 (numerics.md section 1: x = e - BF16_EXP_BIAS,
        # or BF16_SUBNORMAL_EXP for e = 0), decoded at the tree input and carried along with it
        nxs = []
        for j in range(nj):
            for h in (0, 16):
                e = ctl1[j * 32 + h + 7:j * 32 + h + 15]
                for off in (0, 1):
                    nxs.append(Mux(e != 0, BF16_EXP_BIAS - SCORE_FRAC - off - e, -BF16_SUBNORMAL_EXP - SCORE_FRAC - off).as_signed())
        nx = comb(m, Cat(*[comb(m, v, signed(10), "nx") for v in nxs]), unsigned(10 * len(nxs)), "nxs")
        # shift controls: nx registered (+ padding), k - 1 and -k registered, then shift_sat_ctl's two
        # stages: ready with the products of stage B, i.e. lat + 2 registers after ctl1
        assert lat >= 2, "the shift controls need two tree stages"
        nx = delay(m, adv, nx, lat - 1, name="nxt")
        k1s, k2s = {}, {}
        for j in range(nj):
            nx_s, nxm1_s, nx_z, nxm1_z = [nx[(j * 4 + i) * 10:(j * 4 + i + 1) * 10].as_signed() for i in range(4)]
            for gi in range(G):
                eq = self.qexp[gi * 16:(gi + 1) * 16].as_signed()
                k1s[gi, j] = shift_sat_ctl(m, adv, reg(m, adv, nxm1_s - eq, signed(19), name="k1m"),
                                           reg(m, adv, eq - nx_s, signed(19), name="k1n"), 48, TERM_LIMIT_BITS,
                                           d_bits(j) + MANT_BITS, "k1")
                k2s[gi, j] = shift_sat_ctl(m, adv, reg(m, adv, nxm1_z - eq, signed(19), name="k2m"),
                                           reg(m, adv, eq - nx_z, signed(19), name="k2n"), 48, TERM_LIMIT_BITS, 34, "k2")
        vv = v1
        for _ in range(lat):
            vv = reg(m, adv, vv, name="vt")
            valids.append(vv)
        cc = delay(m, adv, ctl1, lat, name="ct")
        kmeta = cc[0:nj * 32]
        lb = cc[nj * 32:nj * 32 + 2]
        rest = cc[nj * 32 + 2:]
        ntok_w = cfg.field_bits["ntok"]
        ntok = rest[0:ntok_w]
        first, last, sq = rest[ntok_w], rest[ntok_w + 1], rest[ntok_w + 2]
        tag = rest[ntok_w + 3:]

        # stage A: multi-word accumulation, S_Q latch, D = D' >> (16 - b)
        sq_reg = [Signal(signed(24), name=f"sq_{gi}") for gi in range(G)]
        dacc = [Signal(signed(WIDE_D_BITS), name=f"dacc_{gi}") for gi in range(G)]
        va = reg(m, adv, vv & last & ~sq, name="va")
        valids.append(va)
        ctla = reg(m, adv, Cat(kmeta, ntok, tag), name="ctla")
        dvals = {}
        wide_a = wide_code(lb) | sq
        for gi in range(G):
            for j in range(nj):
                if nj == 1:
                    s = sums[gi, 0, "full"]
                elif j == 0:       # 8/16-bit codes: the whole chain; 2/4-bit: the lower lane (codes c16 >> 12)
                    s = comb(m, Mux(wide_a, sums[gi, 0, "full"], sums[gi, 0, "lo"] << 12), signed(41), "dsel")
                elif j < npair:    # 4-bit or 2-bit codes as c16 >> 12 (2-bit: 4 c)
                    dvals[gi, j] = reg(m, adv, Mux(lb == WidthCode.W2, sums[gi, j, "lo"] >> 2, sums[gi, j, "lo"]),
                                       signed(NARROW_D_BITS), name="D")
                    continue
                else:              # upper lanes: 2-bit codes only, c16 >> 14
                    dvals[gi, j] = reg(m, adv, sums[gi, j, "hi"], signed(NARROW_D_BITS), name="D")
                    continue
                if j == 0 and cfg.max_wpt > 1:
                    s = comb(m, Mux(first, 0, dacc[gi]) + s, signed(41), "dsum")
                    with m.If(adv & vv & ~sq):
                        m.d.sync += dacc[gi].eq(s)
                if j == 0:
                    with m.If(adv & vv & sq):
                        m.d.sync += sq_reg[gi].eq(sums[gi, 0, "full"])
                sh = comb(m, by_width(lb, lambda w: s >> (16 - w.bits), widths=tuple(reversed(BY_CODE))),
                          signed(WIDE_D_BITS), "dsh")
                dvals[gi, j] = reg(m, adv, sh, signed(WIDE_D_BITS), name="D")
        kmeta_a = ctla[0:nj * 32]
        ntok_a = ctla[nj * 32:nj * 32 + ntok_w]
        tag_a = ctla[nj * 32 + ntok_w:]

        # stage B: ms * D, mz * S_Q
        vb = reg(m, adv, va, name="vb")
        valids.append(vb)
        ctlb = reg(m, adv, Cat(ntok_a, tag_a), name="ctlb")
        t1p, t2p = {}, {}
        for j in range(nj):
            ms, _ = bf16_fields(m, kmeta_a[j * 32:j * 32 + 16])
            mz, _ = bf16_fields(m, kmeta_a[j * 32 + 16:j * 32 + 32])
            for gi in range(G):
                t1p[gi, j] = reg(m, adv, ms * dvals[gi, j], signed(d_bits(j) + MANT_BITS), name="t1p")
                t2p[gi, j] = reg(m, adv, mz * sq_reg[gi], signed(34), name="t2p")

        # stages C1, C2: shift, round, saturate both terms (arith.shift_round_sat_by: two stages)
        vc1 = reg(m, adv, vb, name="vc1")
        vc = reg(m, adv, vc1, name="vc")
        valids += [vc1, vc]
        ctlc = reg(m, adv, reg(m, adv, ctlb, name="ctlc1"), name="ctlc")
        t1s, t2s = {}, {}
        for j in range(nj):
            for gi in range(G):
                t1s[gi, j] = reg(m, adv, shift_round_sat_by(m, adv, t1p[gi, j], k1s[gi, j], TERM_LIMIT_BITS, "t1"),
                                 signed(TERM_LIMIT_BITS + 1), name="t1")
                t2s[gi, j] = reg(m, adv, shift_round_sat_by(m, adv, t2p[gi, j], k2s[gi, j], TERM_LIMIT_BITS, "t2"),
                                 signed(TERM_LIMIT_BITS + 1), name="t2")

        # stage D: score = sat_31(T1 - T2)
        scores = []
        for j in range(nj):
            for gi in range(G):
                diff = comb(m, t1s[gi, j] - t2s[gi, j], signed(TERM_LIMIT_BITS + 2), "diff")
                scores.append(saturate(m, diff, SCORE_BITS - 1, "score")[0:32])
        with m.If(adv):
            m.d.sync += [
                self.o.valid.eq(vc),
                self.o.payload.score.eq(Cat(*scores)),
                self.o.payload.ntok.eq(ctlc[0:ntok_w]),
                self.o.payload.tag.eq(ctlc[ntok_w:]),
            ]
        m.d.comb += self.busy.eq(any_tree(m, Cat(*valids, self.o.valid), name="busy"))
        return m


def ScoreBlock(cfg: DatapathConfig, tag_width: int = 1) -> UnitOnArray:
    """The score unit on an array of its own (hw/macarray.UnitOnArray)."""
    return UnitOnArray(ScoreUnit(cfg, tag_width), "score")
