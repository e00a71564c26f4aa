"""Unpack: packed KV memory words -> MSB-aligned 16-bit code lanes (docs/numerics.md section 2).

Lane (j, d) holds the code of dimension d of the j-th token in the word, shifted to the MSB
(c16 = c << (16 - b)). The width is chosen per word (`lb`), so a stream that switches between
16-bit sink/window tokens and a narrower body needs no reconfiguration. When a token spans several
words (wide codes), `wi` says which word of the token this is and only its dimensions are filled.
Lanes of tokens >= `ntok` (padding at the end of a block) are zero.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .config import DatapathConfig, WidthCode


def unpack_layouts(cfg: DatapathConfig, tag_width: int = 1):
    f = cfg.field_bits
    i_layout = data.StructLayout({
        "word": unsigned(cfg.word_bits),
        "lb": unsigned(2),
        "wi": unsigned(f["wi"]),
        "ntok": unsigned(f["ntok"]),
        "tag": unsigned(tag_width),
    })
    o_layout = data.StructLayout({
        "c16": unsigned(cfg.nj * cfg.head_dim * 16),
        "tag": unsigned(tag_width),
    })
    return i_layout, o_layout


def unpack_lanes(m, cfg: DatapathConfig, word, lb, wi, ntok):
    """Combinational lane extraction; returns a flat value of nj*head_dim*16 bits."""
    W, HD = cfg.word_bits, cfg.head_dim
    lanes = []
    for j in range(cfg.nj):
        tok_ok = Signal(name=f"tok_ok_{j}")
        m.d.comb += tok_ok.eq(ntok > j)
        for d in range(HD):
            terms = []
            for b in cfg.slot_widths(j):
                lb_v = WidthCode.of(b)
                if W >= b * HD:
                    k = j * HD + d
                    cond = tok_ok
                else:
                    per = W // b
                    k = d % per
                    cond = tok_ok & (wi == d // per)
                code = word[k * b:(k + 1) * b]
                terms.append(Mux((lb == lb_v) & cond, Cat(Const(0, 16 - b), code), 0))
            lane = Signal(16, name=f"lane_{j}_{d}")
            acc = 0
            for t in terms:
                acc = acc | t
            m.d.comb += lane.eq(acc)
            lanes.append(lane)
    return Cat(*lanes)


class Unpack(wiring.Component):
    """One pipeline stage: packed word + (lb, wi, ntok) -> c16 lanes, with a pass-through tag."""

    def __init__(self, cfg: DatapathConfig, tag_width: int = 1):
        if not isinstance(cfg, DatapathConfig):
            raise TypeError(f"Unpack needs a DatapathConfig, got {cfg!r}")
        self.cfg = cfg
        self.i_layout, self.o_layout = unpack_layouts(cfg, tag_width)
        super().__init__({
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
        })

    def elaborate(self, platform):
        m = Module()
        adv = Signal()
        m.d.comb += [adv.eq(~self.o.valid | self.o.ready), self.i.ready.eq(adv)]
        p = self.i.payload
        lanes = unpack_lanes(m, self.cfg, p.word, p.lb, p.wi, p.ntok)
        with m.If(adv):
            m.d.sync += [
                self.o.valid.eq(self.i.valid),
                self.o.payload.c16.eq(lanes),
                self.o.payload.tag.eq(p.tag),
            ]
        return m
