"""The run statistics of one job (docs/numerics.md sections 5-7): the running score maximum M per head, the
value magnitude exponent E, and L = sum of p per head (with the Z terms gated the same way for the MAC).
Each clears on `clear` (a job starts) and otherwise folds in what arrives."""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .arith import any_tree, bf16_fields, comb, kept, max_tree, reg
from .config import DatapathConfig, by_width
from .softmax import P_BITS, Z_OUT

M_EMPTY = -(1 << 31)   # M of a run with no score yet
E_EMPTY = -2048        # E of a run with no metadata yet (below any xs + b or xz)
E_TREE_FAN_IN = 4      # E's tree takes the maximum of four per register stage


def _check(cfg, what):
    if not isinstance(cfg, DatapathConfig):
        raise TypeError(f"{what} needs a DatapathConfig, got {cfg!r}")


class ScoreMax(wiring.Component):
    """M[g] = max(M[g], the word's valid scores of head g): the word's lanes registered, their maximum
    (a tree, registered), then the fold. `pending`: a word's maximum is not yet in M."""

    def __init__(self, cfg: DatapathConfig):
        _check(cfg, "ScoreMax")
        self.cfg = cfg
        nj, G = cfg.nj, cfg.groups
        super().__init__({
            "valid": In(1), "score": In(nj * G * 32), "ntok": In(cfg.field_bits["ntok"]), "clear": In(1),
            "m": Out(G * 32), "pending": Out(1),
        })

    def elaborate(self, platform):
        nj, G = self.cfg.nj, self.cfg.groups
        m = Module()
        pend1 = reg(m, 1, self.valid, name="m_pend1")
        m.d.sync += self.pending.eq(pend1 | self.valid)
        for g in range(G):
            M = Signal(signed(32), name=f"M_{g}")
            m.d.comb += self.m[g * 32:(g + 1) * 32].eq(M)
            cands = []
            for j in range(nj):
                v = self.score[(j * G + g) * 32:(j * G + g + 1) * 32].as_signed()
                ok = self.valid & (self.ntok > j)
                cands.append(reg(m, 1, Mux(ok, v, M_EMPTY), signed(32), name="wlane", init=M_EMPTY))
            wmax = reg(m, 1, max_tree(m, cands), signed(32), name="wmax", init=M_EMPTY)
            with m.If(self.clear):
                m.d.sync += M.eq(M_EMPTY)
            with m.Else():
                m.d.sync += M.eq(Mux(wmax > M, wmax, M))
        return m


class ValueExponent(wiring.Component):
    """E = max(E, max over the metadata word's lanes t < rem of max(xs_t + b, xz_t)) for each accepted
    value-metadata word (b: the segment's code width). The lanes are registered, then a tree of maxima
    (E_TREE_FAN_IN per register stage) feeds E. `latency`: cycles from a word's acceptance until E includes
    it."""

    def __init__(self, cfg: DatapathConfig, rem_bits: int):
        _check(cfg, "ValueExponent")
        self.cfg = cfg
        levels, n = 0, cfg.mpw
        while n > 1:
            n, levels = -(-n // E_TREE_FAN_IN), levels + 1
        self.latency = 1 + levels + 1          # the lane registers, the tree's registers, E
        super().__init__({
            "valid": In(1), "word": In(cfg.word_bits), "vlb": In(2), "rem": In(rem_bits), "clear": In(1),
            "e": Out(signed(12)),
        })

    def elaborate(self, platform):
        MPW = self.cfg.mpw
        m = Module()
        e_bits = comb(m, by_width(self.vlb, lambda w: w.bits), unsigned(5), "e_bits")
        # lane t holds a token of this segment iff t < rem (t < MPW): the high bits of rem or a 4-bit compare
        rem = self.rem
        rem_hi = any_tree(m, rem[(MPW - 1).bit_length():], name="rem_hi")
        rem_lo = rem[0:(MPW - 1).bit_length()]
        # the lane masks drive the lane registers' reset pins. `t < rem_lo` is the carry out of
        # rem_lo + (MPW - 1 - t): a carry chain is a box to the LUT mapper, whereas 16 compares of the same
        # 4 bits came out of ABC as one chain of LUTs through each other (7 levels)
        accept = Signal(attrs={"keep": 1})
        m.d.comb += accept.eq(self.valid)
        lanes = []
        for t in range(MPW):
            _, xs = bf16_fields(m, self.word[t * 32:t * 32 + 16])
            _, xz = bf16_fields(m, self.word[t * 32 + 16:t * 32 + 32])
            xsb = comb(m, xs + e_bits, signed(12), "xsb")
            et = comb(m, Mux(xsb > xz, xsb, xz), signed(12), "et")
            gt = comb(m, rem_lo + (MPW - 1 - t), unsigned(len(rem_lo) + 1), "el_gt")
            lane_ok = kept(m, accept & (rem_hi | gt[-1]), unsigned(1), "el_ok")
            lanes.append(reg(m, 1, Mux(lane_ok, et, E_EMPTY), signed(12), name="el", init=E_EMPTY))
        em, regs = lanes, 1
        while len(em) > 1:
            em = [reg(m, 1, max_tree(m, em[i:i + E_TREE_FAN_IN]), signed(12), name="em", init=E_EMPTY)
                  for i in range(0, len(em), E_TREE_FAN_IN)]
            regs += 1
        assert regs + 1 == self.latency
        with m.If(self.clear):
            m.d.sync += self.e.eq(E_EMPTY)
        with m.Else():
            m.d.sync += self.e.eq(Mux(em[0] > self.e, em[0], self.e))
        return m


class RunSums(wiring.Component):
    """p and Z count once per token (its first word) and only for the word's tokens: `z` is the weight
    unit's Z with the other lanes zeroed (for the MAC), and L[g] += sum_j p[j][g] (the word's sum
    registered, then added)."""

    def __init__(self, cfg: DatapathConfig):
        _check(cfg, "RunSums")
        self.cfg = cfg
        nv, G = cfg.value_slots, cfg.groups     # the value pass's token lanes
        super().__init__({
            "valid": In(1), "first": In(1), "ntok": In(cfg.field_bits["ntok"]),
            "p": In(nv * G * P_BITS), "z_in": In(nv * G * Z_OUT), "clear": In(1),
            "z": Out(nv * G * Z_OUT), "l": Out(G * 64),
        })

    def elaborate(self, platform):
        nv, G = self.cfg.value_slots, self.cfg.groups
        m = Module()
        zl, parts = [], {g: [] for g in range(G)}
        for j in range(nv):
            ok = kept(m, self.valid & self.first & (self.ntok > j), unsigned(1), "pz_ok")
            for g in range(G):
                k = j * G + g
                zl.append(Mux(ok, self.z_in[k * Z_OUT:(k + 1) * Z_OUT], 0))
                parts[g].append(Mux(ok, self.p[k * P_BITS:(k + 1) * P_BITS], 0))
        m.d.comb += self.z.eq(Cat(*zl))
        for g in range(G):
            L = Signal(unsigned(64), name=f"L_{g}")
            m.d.comb += self.l[g * 64:(g + 1) * 64].eq(L)
            psum = reg(m, 1, sum(parts[g]), unsigned(P_BITS + 3), name="psum")
            with m.If(self.clear):
                m.d.sync += L.eq(0)
            with m.Else():
                m.d.sync += L.eq(L + psum)
        return m
