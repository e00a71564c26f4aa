"""Shrink unit: progressive quantization on the device (docs/numerics.md section 3).

Reads a block's code words of width 2n and writes width n (two input words -> one output word),
and metadata words whose scales become s' = bf16(s * (2^n + 1)) (zero unchanged):

    q' = ((q << 2n) - (q << n) + q + 2^(3n-1) - 2^(2n-1) + 2^(n-1)) >> 3n,  masked to n bits

Five register stages (the scale product; its top bit; the normalising shift; the rounding decision;
the rounded fields), then the output word (`ShrinkCore`). The engine's `ShrinkUnit` runs a core an eighth of
the word wide (at least 64 bits), eight beats per word, and gathers its outputs back into words.
Stream protocol (`i`): kind 0 = code word, kind 1 = metadata word; `last` marks the block's last code
word (an odd word count then flushes a half-filled output word). `n_lb` is the target width
(8 -> 2, 4 -> 1, 2 -> 0), chosen per word at run time.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from pmkvq_accel.model.formats import BF16_EXP_BIAS, BF16_SUBNORMAL_EXP

from .arith import comb, delay, reg
from .config import WORD_BITS, WidthCode, by_width

TARGETS = (WidthCode.W2, WidthCode.W4, WidthCode.W8)   # the widths a shrink can produce


def shrink_code(m, q, n):
    bias = (1 << (3 * n - 1)) - (1 << (2 * n - 1)) + (1 << (n - 1))
    t = comb(m, (q << (2 * n)) - (q << n) + q + bias, unsigned(4 * n + 1), "shr")
    return t[3 * n:4 * n]


def scale_product(m, s16, n_lb):
    """First stage of bf16(s * (2^n + 1)): (sign, exponent x, P = mant * (2^n + 1)) with n = 2 << n_lb chosen
    at run time; the product as a shift and an add (no multiplier)."""
    e = s16[7:15]
    frac = s16[0:7]
    mant = comb(m, Mux(e == 0, frac, Cat(frac, Const(1, 1))), unsigned(8), "sm")
    x = comb(m, Mux(e == 0, BF16_SUBNORMAL_EXP, e - BF16_EXP_BIAS), signed(10), "sx")
    shifted = by_width(n_lb, lambda w: mant << w.bits, TARGETS)
    P = comb(m, shifted + mant, unsigned(16), "sp")
    return s16[15], x, P


ROUND_STAGES = 3    # register stages inside round_shift
SHRINK_BEATS = 8    # beats per word through the core (ShrinkUnit: why narrower than the word)


def round_shift(m, adv, x, P):
    """Stages 2-5: the top set bit of P, registered; the right shift that brings P to 8 significant bits
    (or to the subnormal range), registered with x + shift and P; the shift and the rounding decision (round to nearest even:
    guard & (sticky | lsb)), registered; then the rounded mantissa and the bf16 fields. Returns the 15
    bits below the sign, combinational from the stage-3 registers (`ROUND_STAGES` after its inputs)."""
    h = Signal(range(16), name="sh_h")        # the top set bit of P (a priority encoder: registered)
    for i in range(16):
        with m.If(P[i]):
            m.d.comb += h.eq(i)
    h1, x1, P1 = reg(m, adv, h, name="sh1"), reg(m, adv, x, name="sx1"), reg(m, adv, P, name="sp1")
    sh_a = comb(m, h1 - 7, signed(6), "sha")
    sh_b = comb(m, BF16_SUBNORMAL_EXP - x1, signed(10), "shb")
    sh = comb(m, Mux(sh_a > sh_b, sh_a, sh_b), signed(10), "shs")
    shu = reg(m, adv, Mux(sh < 0, 0, sh), unsigned(4), name="shu")
    xp = reg(m, adv, x1 + sh, signed(11), name="sxp")
    P2 = reg(m, adv, P1, name="sp2")
    # stage 3: the shift and the round-to-nearest-even decision (guard bit, sticky bits, lsb)
    r = comb(m, P2 >> shu, unsigned(16), "sr")
    shm1 = comb(m, shu - 1, unsigned(4), "shm1")
    guard = comb(m, (P2 >> shm1)[0], unsigned(1), "sg")
    sticky = comb(m, (P2 & ((Const(1, 17) << shm1) - 1)) != 0, unsigned(1), "sst")
    r3 = reg(m, adv, r[0:10], unsigned(10), name="sr3")
    up3 = reg(m, adv, (shu != 0) & guard & (sticky | r[0]), unsigned(1), name="sup3")
    xp3 = reg(m, adv, xp, name="sxp3")
    zero3 = reg(m, adv, P2 == 0, unsigned(1), name="sz3")
    # stage 4: the rounded mantissa and the bf16 fields
    R = comb(m, r3 + up3, unsigned(10), "sR")
    mag = Signal(15, name="s_mag")
    with m.If(zero3):
        m.d.comb += mag.eq(0)
    with m.Elif(R >= 256):
        m.d.comb += mag.eq(Cat(Const(0, 7), (xp3 + 135)[0:8]))
    with m.Elif(R >= 128):
        m.d.comb += mag.eq(Cat(R[0:7], (xp3 + BF16_EXP_BIAS)[0:8]))
    with m.Else():
        m.d.comb += mag.eq(Cat(R[0:7], Const(0, 8)))
    return mag


def _layouts(word_bits):
    return (data.StructLayout({"data": unsigned(word_bits), "kind": 1, "n_lb": unsigned(2), "last": 1}),
            data.StructLayout({"data": unsigned(word_bits), "kind": 1, "last": 1}))


def _check_width(word_bits, what="memory word width"):
    if word_bits not in WORD_BITS:
        raise ValueError(f"unsupported {what} {word_bits!r}: use one of {WORD_BITS} bits")


class ShrinkCore(wiring.Component):
    """The shrink arithmetic on `word_bits`-bit beats at one beat per cycle (the stream protocol above; `o.last`
    marks the code word holding the block's last code)."""

    def __init__(self, word_bits: int):
        _check_width(word_bits)
        self.word_bits = word_bits
        self.i_layout, self.o_layout = _layouts(word_bits)
        super().__init__({
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
        })

    def elaborate(self, platform):
        W = self.word_bits
        m = Module()
        adv = Signal()
        m.d.comb += [adv.eq(~self.o.valid | self.o.ready), self.i.ready.eq(adv)]
        p = self.i.payload
        # stage 1: the code lanes at every target width (then the one chosen), the scales' products
        halves = {}
        for w in TARGETS:
            n = w.bits
            lanes = [shrink_code(m, p.data[i * 2 * n:(i + 1) * 2 * n], n) for i in range(W // (2 * n))]
            halves[w] = comb(m, Cat(*lanes), unsigned(W // 2), f"half{n}")
        new_half = comb(m, by_width(p.n_lb, lambda w: halves[w], TARGETS), unsigned(W // 2), "nh")
        v1 = reg(m, adv, self.i.valid, name="sv1")
        c1 = reg(m, adv, Cat(p.kind, p.last, new_half), name="sc1")
        lanes1 = []
        for k in range(W // 32):
            ent = p.data[k * 32:(k + 1) * 32]
            sign, x, P = scale_product(m, ent[0:16], p.n_lb)
            lanes1.append((reg(m, adv, sign, name="ss1"), reg(m, adv, x, name="sx1"), reg(m, adv, P, name="sp1"),
                           reg(m, adv, ent[16:32], name="sz1")))
        # stages 2-4: the rounded scales; the rest waits beside them
        v2 = v1
        for _ in range(ROUND_STAGES):
            v2 = reg(m, adv, v2, name="sv")        # with reset (delay() is reset-less)
        c2 = delay(m, adv, c1, ROUND_STAGES, name="sc")
        ents = []
        for sign, x, P, zero in lanes1:
            mag = round_shift(m, adv, x, P)
            ents.append(Cat(mag, delay(m, adv, sign, ROUND_STAGES, name="ss"), delay(m, adv, zero, ROUND_STAGES, name="sz")))
        new_meta = comb(m, Cat(*ents), unsigned(W), "nm")
        valid, kind, last, new_half = v2, c2[0], c2[1], c2[2:]
        hold = Signal(W // 2)
        pend = Signal()
        with m.If(adv):
            m.d.sync += self.o.valid.eq(0)
            with m.If(valid):
                with m.If(kind):
                    m.d.sync += [self.o.valid.eq(1), self.o.payload.data.eq(new_meta), self.o.payload.kind.eq(1),
                                 self.o.payload.last.eq(0)]
                with m.Elif(pend):
                    m.d.sync += [self.o.valid.eq(1), self.o.payload.data.eq(Cat(hold, new_half)),
                                 self.o.payload.kind.eq(0), self.o.payload.last.eq(last), pend.eq(0)]
                with m.Elif(last):
                    m.d.sync += [self.o.valid.eq(1), self.o.payload.data.eq(Cat(new_half, Const(0, W // 2))),
                                 self.o.payload.kind.eq(0), self.o.payload.last.eq(1)]
                with m.Else():
                    m.d.sync += [hold.eq(new_half), pend.eq(1)]
        return m


def default_lane_bits(word_bits: int) -> int:
    """The core's width: an eighth of the word (SHRINK_BEATS), at least the narrowest supported word."""
    return max(WORD_BITS[0], word_bits // SHRINK_BEATS)


class ShrinkUnit(wiring.Component):
    """A `word_bits`-bit shrink unit built from a `lane_bits`-bit `ShrinkCore` (default: `default_lane_bits`,
    64 bits in a 512-bit engine): each word goes through the core
    as word_bits / lane_bits beats (read from the input word in place, which the stream holds until the last
    beat) and the core's outputs are gathered back into words; a flushed half word comes out zero-filled.
    Every code and scale is independent of its neighbours, so the words out equal those of a full-width core.

    Why narrower than the word: SHRINK only rewrites blocks as they age (each token at most three times over
    its life), while every decode step reads the whole cache, so the block mover is far off the critical
    rate; a 64-bit core is about an eighth of the full-width one's logic in every engine (LUTs are what bound
    the engines a card holds)."""

    def __init__(self, word_bits: int = 512, lane_bits: int | None = None):
        _check_width(word_bits)
        lane_bits = default_lane_bits(word_bits) if lane_bits is None else lane_bits
        _check_width(lane_bits, "shrink lane width")
        self.word_bits, self.lane_bits = word_bits, min(lane_bits, word_bits)
        self.i_layout, self.o_layout = _layouts(word_bits)
        super().__init__({
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
        })

    def elaborate(self, platform):
        W, L = self.word_bits, self.lane_bits
        r = W // L
        m = Module()
        m.submodules.core = core = ShrinkCore(L)
        if r == 1:
            wiring.connect(m, wiring.flipped(self.i), core.i)
            wiring.connect(m, core.o, wiring.flipped(self.o))
            return m
        # in: beat k of a word is its k-th lane; the word is taken with its last beat
        k_in = Signal(range(r))
        final = k_in == r - 1
        p = self.i.payload
        m.d.comb += [core.i.valid.eq(self.i.valid), core.i.payload.data.eq(p.data.word_select(k_in, L)),
                     core.i.payload.kind.eq(p.kind), core.i.payload.n_lb.eq(p.n_lb),
                     core.i.payload.last.eq(p.last & final), self.i.ready.eq(core.i.ready & final)]
        with m.If(core.i.valid & core.i.ready):
            m.d.sync += k_in.eq(k_in + 1)        # r is a power of two: wraps to 0 after the last beat
        # out: the core's outputs fill the word lane by lane; a full word, or the block's last code word, goes
        # out (the core waits meanwhile); the lanes are cleared when it is taken, so a flush is zero-filled
        lanes = [Signal(L, name=f"lane{i}") for i in range(r)]
        k_out = Signal(range(r))
        q = core.o.payload
        m.d.comb += [core.o.ready.eq(~self.o.valid), self.o.payload.data.eq(Cat(*lanes))]
        with m.If(core.o.valid & core.o.ready):
            for i, lane in enumerate(lanes):
                with m.If(k_out == i):
                    m.d.sync += lane.eq(q.data)
            m.d.sync += [k_out.eq(k_out + 1), self.o.payload.kind.eq(q.kind), self.o.payload.last.eq(q.last)]
            with m.If((k_out == r - 1) | q.last):
                m.d.sync += [self.o.valid.eq(1), k_out.eq(0)]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += [self.o.valid.eq(0)] + [lane.eq(0) for lane in lanes]
        return m
