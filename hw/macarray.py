"""The shared multiply array: the DSP48E2 slices (hw/dsp.py) of the score unit's dot products and of the
value MAC's value slots are the same slices.

The key pass feeds only the score unit and the value pass only the value MAC, so one slice serves a score
product (A = the packed key codes of a dimension, B = a query code) in the key pass and a value product
(D = a weight W, B = a value code lane) in the value pass. Per head there are npair x head_dim slices
(npair = cfg.value_slots = max(1, nj / 2), the score unit's slot pairs, equal to the value MAC's slots):

- score chains: slice (g, f), f = k head_dim + d, is dimension d of slot pair k, position d % CHAIN of
  the cascade (g, k, d // CHAIN); Z = PCIN (0 at a cascade's head), W = 0;
- value chains: the same slice is value slot kk = f % npair of dimension dv = f // npair: the value chain of
  (g, dv) is npair consecutive slices of one score cascade (CHAIN is even), its head adding the C input
  (Z = C) and its last slice accumulating the run (W = P, 0 on a run's first beat).

The mode is `value_mode`; the caller changes it only while both pipelines are empty (the value pass waits for
the score unit to drain, `v_go`; the next job's key pass starts after the results, which wait for the MAC).
The B operand is the one multiplexer in fabric (Q or the code lane, 16 bits); A/D is the pre-adder's
INMODE choice, Z and W are OPMODE fields.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .config import DatapathConfig
from .dsp import INMODE_A, INMODE_D, P_BITS, W_P, W_ZERO, Z_C, Z_PCIN, Z_ZERO, DspSlice, opmode

CHAIN = 16        # products per score cascade (the code skew costs one SRL16 per bit)
SCORE_A_BITS = 26 # the packed key-code operand (unsigned; hw/score.py `_packed`)
W_BITS = 27       # the weight operand (signed, >= 0; hw/softmax.py W_OUT)


def element(flat, i: int, bits: int):
    """Element i of a flat port of `bits`-bit elements (flat ports, not data.ArrayLayout: yosys' ABC9 pass
    trips over the `name[i]` wires Amaranth emits for array views next to primitive instances)."""
    return flat[i * bits:(i + 1) * bits]


def geometry(cfg: DatapathConfig) -> tuple[int, int, int]:
    """(npair, chain, chains per (head, pair)): the array's shape, shared by the score unit and the MAC."""
    npair, chain = cfg.value_slots, min(CHAIN, cfg.head_dim)      # the score unit's pairs = the value slots
    return npair, chain, cfg.head_dim // chain


class MacArray(wiring.Component):
    """Ports (flat arrays of elements, `element(port, index, bits)`, index order as named):
    score side: s_a[k, d] (packed codes, skewed by d % CHAIN), q[g, d] (signed 16), s_ce;
                s_sum[g, k, c] (the cascades' sums, 48 bits signed)
    value side: v_d[kk, g] (W, skewed by kk), v_b[kk, d] (code lane c16, skewed by kk), v_c[g, d] (the
                chain head's C input), v_ce, v_ce_tail (the last slice's P), v_keep (W = P);
                v_p[g, d] (the last slice's P: the run's sum mod 2^48)"""

    def __init__(self, cfg: DatapathConfig):
        self.cfg = cfg
        npair, chain, nchain = geometry(cfg)
        hd, G = cfg.head_dim, cfg.groups
        super().__init__({
            "value_mode": In(1),
            "s_a": In(npair * hd * SCORE_A_BITS),
            "q": In(G * hd * 16),
            "s_ce": In(1),
            "s_sum": Out(G * npair * nchain * P_BITS),
            "v_d": In(npair * G * W_BITS),
            "v_b": In(npair * hd * 16),
            "v_c": In(G * hd * P_BITS),
            "v_ce": In(1), "v_ce_tail": In(1), "v_keep": In(1),
            "v_p": Out(G * hd * P_BITS),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        npair, chain, nchain = geometry(cfg)
        hd, G = cfg.head_dim, cfg.groups
        m = Module()
        vm = self.value_mode
        for g in range(G):
            prev = None
            for f in range(npair * hd):
                k, d = divmod(f, hd)
                dv, kk = divmod(f, npair)
                pos = d % chain
                head, tail = kk == 0, kk == npair - 1
                s = DspSlice()
                m.submodules[f"mac_{g}_{f}"] = s
                z_score = Z_PCIN if pos else Z_ZERO
                z_value = Z_C if head else Z_PCIN
                w_value = Mux(self.v_keep, opmode(W_P, z_value), opmode(W_ZERO, z_value)) if tail \
                    else opmode(W_ZERO, z_value)
                m.d.comb += [
                    s.a.eq(element(self.s_a, f, SCORE_A_BITS)),
                    s.d.eq(element(self.v_d, kk * G + g, W_BITS).as_signed()),
                    s.b.eq(Mux(vm, element(self.v_b, kk * hd + dv, 16), element(self.q, g * hd + d, 16).as_signed())),
                    s.c.eq(element(self.v_c, g * hd + dv, P_BITS) if head else 0),
                    s.pcin.eq(prev.pcout if pos else 0),
                    s.opmode.eq(Mux(vm, w_value, opmode(W_ZERO, z_score))),
                    s.inmode.eq(Mux(vm, INMODE_D, INMODE_A)),
                    s.ce_m.eq(Mux(vm, self.v_ce, self.s_ce)),
                    s.ce_p.eq(Mux(vm, self.v_ce_tail if tail else self.v_ce, self.s_ce)),
                ]
                if pos == chain - 1:
                    m.d.comb += element(self.s_sum, (g * npair + k) * nchain + d // chain, P_BITS).eq(s.p)
                if tail:
                    m.d.comb += element(self.v_p, g * hd + dv, P_BITS).eq(s.p)
                prev = s
        return m


def attach(m, array: MacArray, score=None, mac=None):
    """Connect a score unit's and/or a value MAC's array ports (arr_*) to `array`."""
    if score is not None:
        m.d.comb += [array.s_a.eq(score.arr_a), array.q.eq(score.arr_q), array.s_ce.eq(score.arr_ce),
                     score.arr_sum.eq(array.s_sum)]
    if mac is not None:
        m.d.comb += [array.v_d.eq(mac.arr_d), array.v_b.eq(mac.arr_b), array.v_c.eq(mac.arr_c),
                     array.v_ce.eq(mac.arr_ce), array.v_ce_tail.eq(mac.arr_ce_tail), array.v_keep.eq(mac.arr_keep),
                     mac.arr_p.eq(array.v_p)]


def expose(m, outer, inner):
    """Forward every member of `outer`'s signature to the member of the same name of `inner` (a block
    wrapper exposing its unit's ports)."""
    for name, member in outer.signature.members.items():
        o, i = getattr(outer, name), getattr(inner, name)
        if member.is_port:
            m.d.comb += (i.eq(o) if member.flow == In else o.eq(i))
        elif member.flow == In:
            wiring.connect(m, wiring.flipped(o), i)
        else:
            wiring.connect(m, i, wiring.flipped(o))


class UnitOnArray(wiring.Component):
    """A score unit (`role` "score") or a value MAC ("mac") on a multiply array of its own, held in that
    unit's mode: the block as tested and synthesised alone (the engine's datapath shares one array)."""

    def __init__(self, unit, role: str):
        if role not in ("score", "mac"):
            raise ValueError(f"UnitOnArray role {role!r}: use 'score' or 'mac'")
        self.unit, self.role = unit, role
        self.i_layout, self.o_layout = unit.i_layout, unit.o_layout
        super().__init__(unit.block_members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = self.unit
        m.submodules.array = array = MacArray(self.unit.cfg)
        expose(m, self, self.unit)
        attach(m, array, **{self.role: self.unit})
        m.d.comb += array.value_mode.eq(self.role == "mac")
        return m
