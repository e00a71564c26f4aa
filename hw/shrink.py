"""Shrink unit: progressive quantization on the device (docs/numerics.md section 3).

Reads a block's code words of width 2n and writes width n (two input words -> one output word),
and metadata words whose scales become s' = bf16(s * (2^n + 1)) (zero unchanged):

    q' = ((q << 2n) - (q << n) + q + 2^(3n-1) - 2^(2n-1) + 2^(n-1)) >> 3n,  masked to n bits

Stream protocol (`i`): kind 0 = code word, kind 1 = metadata word; `last` marks the block's last code
word (an odd word count then flushes a half-filled output word). `n_lb` is the target width
(8 -> 2, 4 -> 1, 2 -> 0), chosen per word at run time.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from pmkvq_accel.model.formats import BF16_EXP_BIAS, BF16_SUBNORMAL_EXP

from .arith import comb
from .config import WORD_BITS


def shrink_code(m, q, n):
    bias = (1 << (3 * n - 1)) - (1 << (2 * n - 1)) + (1 << (n - 1))
    t = comb(m, (q << (2 * n)) - (q << n) + q + bias, unsigned(4 * n + 1), "shr")
    return t[3 * n:4 * n]


def shrink_scale_bits(m, s16, n):
    """bf16 pattern -> bf16(s * (2^n + 1)), round to nearest even (subnormals kept)."""
    sign = s16[15]
    e = s16[7:15]
    frac = s16[0:7]
    mant = comb(m, Mux(e == 0, frac, Cat(frac, Const(1, 1))), unsigned(8), "sm")
    x = comb(m, Mux(e == 0, BF16_SUBNORMAL_EXP, e - BF16_EXP_BIAS), signed(10), "sx")
    P = comb(m, mant * ((1 << n) + 1), unsigned(16), "sp")
    h = Signal(range(16), name="sh_h")
    for i in range(16):
        with m.If(P[i]):
            m.d.comb += h.eq(i)
    sh_a = comb(m, h - 7, signed(6), "sha")
    sh_b = comb(m, BF16_SUBNORMAL_EXP - x, signed(10), "shb")
    sh = comb(m, Mux(sh_a > sh_b, sh_a, sh_b), signed(10), "shs")
    shu = comb(m, Mux(sh < 0, 0, sh), unsigned(4), "shu")
    r = comb(m, P >> shu, unsigned(16), "sr")
    rem_mask = comb(m, (Const(1, 17) << shu) - 1, unsigned(17), "srm")
    rem = comb(m, P & rem_mask, unsigned(16), "srem")
    shm1 = comb(m, shu - 1, unsigned(4), "shm1")
    half = comb(m, Mux(shu == 0, 0, Const(1, 17) << shm1), unsigned(17), "shalf")
    up = comb(m, (rem > half) | ((rem == half) & (shu != 0) & r[0]), unsigned(1), "sup")
    R = comb(m, r + up, unsigned(10), "sR")
    xp = comb(m, x + sh, signed(11), "sxp")
    out = Signal(16, name="s_out")
    with m.If(P == 0):
        m.d.comb += out.eq(Cat(Const(0, 15), sign))
    with m.Elif(R >= 256):
        m.d.comb += out.eq(Cat(Const(0, 7), (xp + 135)[0:8], sign))
    with m.Elif(R >= 128):
        m.d.comb += out.eq(Cat(R[0:7], (xp + BF16_EXP_BIAS)[0:8], sign))
    with m.Else():
        m.d.comb += out.eq(Cat(R[0:7], Const(0, 8), sign))
    return out


class ShrinkUnit(wiring.Component):
    def __init__(self, word_bits: int = 512):
        if word_bits not in WORD_BITS:
            raise ValueError(f"unsupported memory word width {word_bits!r}: use one of {WORD_BITS} bits")
        self.word_bits = word_bits
        self.i_layout = data.StructLayout({"data": unsigned(word_bits), "kind": 1, "n_lb": unsigned(2),
                                           "last": 1})
        self.o_layout = data.StructLayout({"data": unsigned(word_bits), "kind": 1})
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
        halves = []
        metas = []
        for lb, n in ((0, 2), (1, 4), (2, 8)):
            lanes = [shrink_code(m, p.data[i * 2 * n:(i + 1) * 2 * n], n) for i in range(W // (2 * n))]
            halves.append(comb(m, Cat(*lanes), unsigned(W // 2), f"half{n}"))
            ents = []
            for k in range(W // 32):
                ent = p.data[k * 32:(k + 1) * 32]
                ents.append(Cat(shrink_scale_bits(m, ent[0:16], n), ent[16:32]))
            metas.append(comb(m, Cat(*ents), unsigned(W), f"meta{n}"))
        new_half = comb(m, Mux(p.n_lb == 0, halves[0], Mux(p.n_lb == 1, halves[1], halves[2])), unsigned(W // 2), "nh")
        new_meta = comb(m, Mux(p.n_lb == 0, metas[0], Mux(p.n_lb == 1, metas[1], metas[2])), unsigned(W), "nm")
        hold = Signal(W // 2)
        pend = Signal()
        with m.If(adv):
            m.d.sync += self.o.valid.eq(0)
            with m.If(self.i.valid):
                with m.If(p.kind):
                    m.d.sync += [self.o.valid.eq(1), self.o.payload.data.eq(new_meta), self.o.payload.kind.eq(1)]
                with m.Elif(pend):
                    m.d.sync += [self.o.valid.eq(1), self.o.payload.data.eq(Cat(hold, new_half)),
                                 self.o.payload.kind.eq(0), pend.eq(0)]
                with m.Elif(p.last):
                    m.d.sync += [self.o.valid.eq(1), self.o.payload.data.eq(Cat(new_half, Const(0, W // 2))),
                                 self.o.payload.kind.eq(0)]
                with m.Else():
                    m.d.sync += [hold.eq(new_half), pend.eq(1)]
        return m
