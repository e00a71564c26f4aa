"""Value accumulation (value pass): acc[g][d] += sum_j (W[j][g] * c16[j][d] - Z[j][g])
(docs/numerics.md section 7).

Token slots that can hold codes wider than 2 bits (`DatapathConfig.slot_bits`) multiply in DSPs: per
(head, dimension) one cascade of DSP48E2 slices over those slots (hw/dsp.py; the k-th slot of the chain is
skewed by k cycles) whose last slice accumulates the run in its P; a count of P's wraps in fabric extends
it to the 64-bit accumulator. Slots that only ever hold 2-bit codes (slots
2 and 3 of a 512-bit word at head_dim 64) need no multiplier: W * c16 = (c * W) << 14 for c in 0..3 is a
choice among 0, W, 2W and 3W, with 3W formed once per (slot, head) and shared by every dimension. The
first such slot chooses among -sum_j Z + a * W << 14 instead (the Z sum folded into its candidates),
and the sum of the choices is the C input of the chain's first stage. Those choices take the same two
cycles the chain saves, so the unit's latency is unchanged at nj = 4.

The caller zeroes the Z lanes that must not count (empty slots, the later words of a multi-word token)
and the code lanes of tokens a word does not hold (the unpacker does). Beats with `clear` start a new
run; after the beat with `last` the output holds the accumulators (o.valid) until o.ready, stalling new
input meanwhile.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import delay, kept, reg
from .config import DatapathConfig
from .dsp import P_BITS
from .macarray import UnitOnArray, dsp_slots, element
from .softmax import W_OUT, Z_OUT

ACC_BITS = 64
# |W c16 - Z| < 2^42 + 2^42 per token slot and at most 4 slots per word: a beat moves the accumulator by less
# than this, which the wrap count of `_wide_acc` needs (< 2^46)
BEAT_SUM_BOUND = 4 * (2 ** (W_OUT - 1 + 16) + 2 ** (Z_OUT - 2))
assert BEAT_SUM_BOUND < 2 ** (P_BITS - 2)


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
        self.block_members = {
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
            "busy": Out(1),
        }
        nds = len(dsp_slots(cfg))
        super().__init__({
            **self.block_members,
            # the DSP slots run on the shared multiply array (hw/macarray.py): operands out, the sums in
            "arr_d": Out(nds * G * W_OUT),
            "arr_b": Out(nds * hd * 16),
            "arr_c": Out(G * hd * P_BITS),
            "arr_ce": Out(1), "arr_ce_tail": Out(1), "arr_keep": Out(1),
            "arr_p": In(G * hd * P_BITS),
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
        # -sum_j Z per head (registered): pair sums as kept LUT outputs, then the sum and its negation
        nz = []
        for gi in range(G):
            zl = [p.z[(j * G + gi) * Z_OUT:(j * G + gi + 1) * Z_OUT].as_signed() for j in range(nj)]
            half = [kept(m, sum(zl[i:i + 2]), signed(Z_OUT + 1), "mz") for i in range(0, nj, 2)]
            nz.append(reg(m, adv, -sum(half), signed(Z_OUT + 2), name="mnz"))     # |sum| < nj * 2^42
        w_in = {(j, gi): p.w[(j * G + gi) * W_OUT:(j * G + gi + 1) * W_OUT].as_signed()
                for j in range(nj) for gi in range(G)}
        lane = {(j, d): p.c16[(j * hd + d) * 16:(j * hd + d + 1) * 16] for j in range(nj) for d in range(hd)}
        dslots = dsp_slots(cfg)
        lut_slots = [j for j in range(nj) if cfg.slot_bits(j) == 2]
        if lut_slots:
            c_in, skew = self._lut_slots(m, adv, lut_slots, nz, w_in, lane)
        else:
            c_in, skew = {(gi, d): nz[gi] for gi in range(G) for d in range(hd)}, 0
        # the chains: the k-th DSP slot's operands delayed by skew + k cycles (c_in arrives skew + 1 cycles
        # after the beat); a word's sum is ready `lat` cycles after it
        ws = {(j, gi): delay(m, adv, w_in[j, gi], skew + k, name="mws")
              for k, j in enumerate(dslots) for gi in range(G)}
        cs = {(j, d): delay(m, adv, lane[j, d], skew + k, name="mcs")
              for k, j in enumerate(dslots) for d in range(hd)}
        # per (head, dimension) a chain of the multiply array's slices, one per DSP slot (slot k's product
        # registered k cycles after slot 0's), the first adding c_in, the last accumulating the run in its P
        # (W = P; W = 0 on a run's first beat): the word's sum never leaves the cascade
        lat = skew + len(dslots) + 1          # a beat's sum is in the last slice's P `lat` cycles after it
        vv, valids = v1, [v1]
        for _ in range(lat - 1):
            vv = reg(m, adv, vv, name="mvt")
            valids.append(vv)
        v_acc, c_acc = valids[lat - 2], delay(m, adv, c1, lat - 2, name="mca")   # the beat entering the P
        cc = delay(m, adv, c1, lat - 1, name="mct")
        clear, last = cc[0], cc[1]
        for kk, j in enumerate(dslots):
            for gi in range(G):
                m.d.comb += element(self.arr_d, kk * G + gi, W_OUT).eq(ws[j, gi])
            for d in range(hd):
                m.d.comb += element(self.arr_b, kk * hd + d, 16).eq(cs[j, d])
        m.d.comb += [self.arr_ce.eq(adv), self.arr_ce_tail.eq(adv & v_acc), self.arr_keep.eq(~c_acc[0])]
        accs = []
        for gi in range(G):
            for d in range(hd):
                m.d.comb += element(self.arr_c, gi * hd + d, P_BITS).eq(c_in[gi, d])
                accs.append(self._wide_acc(m, adv & vv, clear, element(self.arr_p, gi * hd + d, P_BITS), f"{gi}_{d}"))
        with m.If(adv):
            m.d.sync += self.o.valid.eq(vv & last)
        m.d.comb += self.o.payload.acc.eq(Cat(*accs))
        busy = 0
        for v in valids:
            busy = busy | v
        m.d.comb += self.busy.eq(busy)
        return m

    @staticmethod
    def _wide_acc(m, en, clear, p, tag):
        """The 64-bit accumulator of a run whose low 48 bits wrap inside a slice's P: acc = hi * 2^48 + lo,
        lo = P (unsigned), hi counting P's wraps. A beat changes P by less than 2^46 (BEAT_SUM_BOUND), so P's
        top two bits step 11 -> 00 exactly when it wrapped upwards and 00 -> 11 when downwards; on a run's
        first beat (P = the beat's sum) hi is P's sign. Registered on the beat after P (`en`)."""
        hi = Signal(signed(ACC_BITS - P_BITS), name=f"acc_hi_{tag}")
        lo = Signal(P_BITS, name=f"acc_lo_{tag}")
        ptop = Signal(2, name=f"acc_top_{tag}")              # P's top bits after the run's previous beat
        top = p[P_BITS - 2:]
        up = (ptop == 0b11) & (top == 0b00)
        down = (ptop == 0b00) & (top == 0b11)
        # hi' = (0 if clear else hi) + step, step in {-1, 0, 1}: the clear folds into the adder's LUTs
        step = Signal(signed(2), name=f"acc_step_{tag}")
        m.d.comb += step.eq(Mux(clear, -top[1], Mux(up, 1, Mux(down, -1, 0))))
        with m.If(en):
            m.d.sync += [lo.eq(p), ptop.eq(top), hi.eq(Mux(clear, 0, hi) + step)]
        return Cat(lo, hi)

    def _lut_slots(self, m, adv, slots, nz, w_in, lane):
        """The products of the 2-bit-only slots as choices, summed with -sum Z: the chain's C input per
        (head, dimension), registered 3 cycles after the beat. Returns (c_in, skew = 2): the DSP slots'
        operands are delayed 2 cycles so that c_in meets the chain's first stage.

        W * c16 = (c W) << 14 and -sum Z keep their low 14 bits apart: the choices are made on the bits
        above (cand = (-sum Z >> 14) + a W for the first slot, a W for the others), and the low 14 bits of
        -sum Z are carried beside them."""
        G, hd = self.cfg.groups, self.cfg.head_dim
        first, rest = slots[0], slots[1:]
        code = {(j, d): lane[j, d][14:16] for j in slots for d in range(hd)}
        # cycle 1: W and 3W per (slot, head); the codes
        mult = {}
        for j in slots:
            for gi in range(G):
                w = w_in[j, gi].as_unsigned()[0:W_OUT - 1]                 # W >= 0
                w1 = reg(m, adv, w, unsigned(W_OUT - 1), name="lw")
                w3 = reg(m, adv, (w << 1) + w, unsigned(W_OUT + 1), name="lw3")   # an adder, not a multiplier
                mult[j, gi] = (w1, w3)
        code1 = {k: delay(m, adv, v, 1, name="lc") for k, v in code.items()}
        # cycle 2: the first slot's candidates per head; the other slots' choices per (head, dimension)
        cand, nz_lo = {}, {}
        for gi in range(G):
            w1, w3 = mult[first, gi]
            hi = nz[gi][14:].as_signed()
            cand[gi] = [reg(m, adv, hi + a, signed(len(nz[gi]) - 14 + 2), name="lcand")
                        for a in (0, w1, w1 << 1, w3)]
            nz_lo[gi] = delay(m, adv, nz[gi][0:14], 1, name="lzl")
        chosen = {}
        for j in rest:
            for gi in range(G):
                w1, w3 = mult[j, gi]
                for d in range(hd):
                    chosen[j, gi, d] = reg(m, adv, _choose(code1[j, d], (0, w1, w1 << 1, w3)), unsigned(W_OUT + 1),
                                           name="lch")
        code2 = {d: delay(m, adv, code1[first, d], 1, name="lc") for d in range(hd)}
        # cycle 3: the first slot's choice plus the others' -> C input
        c_in = {}
        for gi in range(G):
            for d in range(hd):
                hi = _choose(code2[d], cand[gi]) + sum(chosen[j, gi, d] for j in rest)
                c_in[gi, d] = reg(m, adv, Cat(nz_lo[gi], hi), signed(48), name="lcin")
        return c_in, 2


def MacBlock(cfg: DatapathConfig) -> UnitOnArray:
    """The value MAC on an array of its own (hw/macarray.UnitOnArray)."""
    return UnitOnArray(ValueMac(cfg), "mac")



def _choose(c, options):
    """options[c] for a 2-bit c, as a 4:1 multiplexer (one LUT6 per bit)."""
    return Mux(c[1], Mux(c[0], options[3], options[2]), Mux(c[0], options[1], options[0]))
