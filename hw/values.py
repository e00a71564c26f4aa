"""Value accumulation (value pass): acc[g][d] += sum_j (W[j][g] * c16[j][d] - Z[j][g])
(docs/numerics.md section 7).

Per (head, dimension) the nj products of a word go through one systolic multiply-add chain (DSP48
cascade; token slot j is skewed by j cycles) whose first stage also adds -sum_j Z[j][g] (the DSP's C
input, shared by the head's dimensions), then into a 64-bit accumulator. The caller zeroes the Z lanes
that must not count (empty slots, the later words of a multi-word token).
Beats with `clear` start a new run; after the beat with `last` the output holds the accumulators
(o.valid) until o.ready, stalling new input meanwhile.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import delay, kept, mac_chain, reg
from .config import DatapathConfig
from .softmax import W_OUT, Z_OUT

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
            "z": unsigned(nj * G * Z_OUT),     # lane (j, g) at (j*G + g)*Z_OUT, signed
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
        # -sum_j Z per head, registered: the C input of each chain's first stage, added with its product
        nz = []
        for gi in range(G):
            zl = [p.z[(j * G + gi) * Z_OUT:(j * G + gi + 1) * Z_OUT].as_signed() for j in range(nj)]
            # the pair sums as kept LUT outputs: an adder each, then the sum and its negation
            half = [kept(m, sum(zl[i:i + 2]), signed(Z_OUT + 1), "mz") for i in range(0, nj, 2)]
            nz.append(reg(m, adv, -sum(half), signed(Z_OUT + 2), name="mnz"))     # |sum| < nj * 2^42
        # the chains: slot j's operands delayed by j cycles; a word's sum is ready `lat` cycles after it
        ws = {(j, gi): delay(m, adv, p.w[(j * G + gi) * W_OUT:(j * G + gi + 1) * W_OUT].as_signed(), j, name="mws")
              for j in range(nj) for gi in range(G)}
        cs = {(j, d): delay(m, adv, p.c16[(j * hd + d) * 16:(j * hd + d + 1) * 16], j, name="mcs")
              for j in range(nj) for d in range(hd)}
        sums = {}
        for gi in range(G):
            for d in range(hd):
                # |W c| < 2^42 and |Z| < 2^42 per slot, nj <= 4: every partial sum fits the DSP's 48 bits
                sums[gi, d], lat = mac_chain(m, adv, [(ws[j, gi], cs[j, d]) for j in range(nj)], nz[gi], name="vc",
                                             width=48)
        vv, valids = v1, [v1]
        for _ in range(lat - 1):
            vv = reg(m, adv, vv, name="mvt")
            valids.append(vv)
        cc = delay(m, adv, c1, lat - 1, name="mct")
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
