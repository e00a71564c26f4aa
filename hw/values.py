"""Value accumulation (value pass): acc[g][d] += sum_j W[j][g] * c16[j][d] (docs/numerics.md section 7).

The Z terms do not depend on d; the datapath sums them per head and subtracts once at the output.
Beats with `clear` start a new run; after the beat with `last` the output holds the accumulators
(o.valid) until o.ready, stalling new input meanwhile.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import comb, reg, tree_sum
from .config import DatapathConfig
from .softmax import W_OUT

ACC_BITS = 64


class ValueMac(wiring.Component):
    def __init__(self, cfg: DatapathConfig):
        if not isinstance(cfg, DatapathConfig):
            raise TypeError(f"ValueMac needs a DatapathConfig, got {cfg!r}")
        self.cfg = cfg
        nj, hd, G = cfg.nj, cfg.head_dim, cfg.groups
        self.i_layout = data.StructLayout({
            "c16": unsigned(nj * hd * 16),
            "w": unsigned(nj * G * W_OUT),     # lane (j, g) at (j*G + g)*W_OUT, signed
            "clear": 1, "last": 1,
        })
        self.o_layout = data.StructLayout({"acc": unsigned(G * hd * ACC_BITS)})  # (g, d) at (g*hd + d)*64
        super().__init__({
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        nj, hd, G = cfg.nj, cfg.head_dim, cfg.groups
        m = Module()
        adv = Signal()
        m.d.comb += [adv.eq(~self.o.valid | self.o.ready), self.i.ready.eq(adv)]
        p = self.i.payload
        v1 = reg(m, adv, self.i.valid, name="mv1")
        c1 = reg(m, adv, Cat(p.clear, p.last), name="mc1")
        prods = {}
        for j in range(nj):
            for gi in range(G):
                w = p.w[(j * G + gi) * W_OUT:(j * G + gi + 1) * W_OUT].as_signed()
                for d in range(hd):
                    c = p.c16[(j * hd + d) * 16:(j * hd + d + 1) * 16]
                    prods[gi, j, d] = reg(m, adv, w * c, signed(W_OUT + 17), name="vp")
        vv, cc, lat = v1, c1, 0
        sums = {}
        for gi in range(G):
            for d in range(hd):
                sums[gi, d], lat = tree_sum(m, adv, [prods[gi, j, d] for j in range(nj)], 2, "vs")
        valids = [v1]
        for _ in range(lat):
            vv = reg(m, adv, vv, name="mvt")
            cc = reg(m, adv, cc, name="mct")
            valids.append(vv)
        if nj > 1:
            sums = {k: reg(m, adv, v, name="vsr") for k, v in sums.items()}
            vv = reg(m, adv, vv, name="mv2")
            cc = reg(m, adv, cc, name="mc2")
            valids.append(vv)
        clear, last = cc[0], cc[1]
        accs = []
        for gi in range(G):
            for d in range(hd):
                acc = Signal(signed(ACC_BITS), name=f"acc_{gi}_{d}")
                with m.If(adv & vv):
                    m.d.sync += acc.eq(Mux(clear, 0, acc) + sums[gi, d])
                accs.append(acc)
        with m.If(adv):
            m.d.sync += self.o.valid.eq(vv & last)
        m.d.comb += self.o.payload.acc.eq(Cat(*accs))
        busy = 0
        for v in valids:
            busy = busy | v
        m.d.comb += self.busy.eq(busy)
        return m
