"""Value accumulation (value pass): acc[g][d] += sum_j (W[j][g] * c16[j][d] - Z[j][g])
(docs/numerics.md section 7).

The value pass has `cfg.value_slots` token slots (a 2-bit word comes in two beats, hw/control.py), each
multiplied on the shared array (hw/macarray.py): per (head, dimension) one cascade of DSP48E2 slices over
the slots (hw/dsp.py; the k-th slot of the chain is skewed by k cycles) whose head adds -sum_j Z and whose
last slice accumulates the run in its P; a count of P's wraps in fabric extends it to `acc_bits` (60: enough for
any run, exactly), sign-extended to the result's 64 bits.

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
from .config import MAX_VALUE_SLOTS, DatapathConfig
from .dsp import P_BITS
from .macarray import UnitOnArray, element
from .softmax import W_OUT, Z_OUT

ACC_BITS = 64           # the accumulators as the result carries them (attention_partial's int64 acc)
# |W c16 - Z| < 2^42 + 2^42 per token (one product and one Z per token and (head, dimension): the later words
# of a multi-word token hold other dimensions and no Z)
TOKEN_SUM_BOUND = 2 ** (W_OUT - 1 + 16) + 2 ** (Z_OUT - 2)
# at most MAX_VALUE_SLOTS tokens per beat: a beat moves the accumulator by less than this, which the wrap
# count of `_wide_acc` needs (< 2^46)
BEAT_SUM_BOUND = MAX_VALUE_SLOTS * TOKEN_SUM_BOUND
assert BEAT_SUM_BOUND < 2 ** (P_BITS - 2)


def acc_bits(cfg: DatapathConfig) -> int:
    """Signed bits that hold any accumulator of a run exactly: |acc| < max_tokens x TOKEN_SUM_BOUND (60 at
    65 536 tokens). The MAC keeps that many (P and a count of its wraps) and sign-extends to ACC_BITS."""
    bits = (cfg.max_tokens * TOKEN_SUM_BOUND - 1).bit_length() + 1
    assert P_BITS < bits <= ACC_BITS
    return bits


class ValueMac(wiring.Component):
    def __init__(self, cfg: DatapathConfig):
        if not isinstance(cfg, DatapathConfig):
            raise TypeError(f"ValueMac needs a DatapathConfig, got {cfg!r}")
        self.cfg = cfg
        nv, hd, G = cfg.value_slots, cfg.head_dim, cfg.groups
        self.i_layout = data.StructLayout({
            "c16": unsigned(nv * hd * 16),
            "w": unsigned(nv * G * W_OUT),     # lane (j, g) at (j*G + g)*W_OUT, signed
            "z": unsigned(nv * G * Z_OUT),     # lane (j, g) at (j*G + g)*Z_OUT, signed
            "clear": 1, "last": 1,
        })
        self.o_layout = data.StructLayout({"acc": unsigned(G * hd * ACC_BITS)})  # (g, d) at (g*hd + d)*64
        self.block_members = {
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
            "busy": Out(1),
        }
        super().__init__({
            **self.block_members,
            # the slots' products run on the shared multiply array (hw/macarray.py): operands out, the sums in
            "arr_d": Out(nv * G * W_OUT),
            "arr_b": Out(nv * hd * 16),
            "arr_c": Out(G * hd * P_BITS),
            "arr_ce": Out(1), "arr_ce_tail": Out(1), "arr_keep": Out(1),
            "arr_p": In(G * hd * P_BITS),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        nv, hd, G = cfg.value_slots, cfg.head_dim, cfg.groups
        m = Module()
        adv = Signal()
        m.d.comb += [adv.eq(~self.o.valid | self.o.ready), self.i.ready.eq(adv)]
        p = self.i.payload
        v1 = reg(m, adv, self.i.valid, name="mv1")
        c1 = reg(m, adv, Cat(p.clear, p.last), name="mc1")
        # -sum_j Z per head (registered): pair sums as kept LUT outputs, then the sum and its negation
        nz = []
        for gi in range(G):
            zl = [p.z[(j * G + gi) * Z_OUT:(j * G + gi + 1) * Z_OUT].as_signed() for j in range(nv)]
            half = [kept(m, sum(zl[i:i + 2]), signed(Z_OUT + 1), "mz") for i in range(0, nv, 2)]
            nz.append(reg(m, adv, -sum(half), signed(Z_OUT + 2), name="mnz"))     # |sum| < nv * 2^42
        w_in = {(j, gi): p.w[(j * G + gi) * W_OUT:(j * G + gi + 1) * W_OUT].as_signed()
                for j in range(nv) for gi in range(G)}
        lane = {(j, d): p.c16[(j * hd + d) * 16:(j * hd + d + 1) * 16] for j in range(nv) for d in range(hd)}
        # the chains: slot j's operands delayed by j cycles (-sum Z, the chain head's C input, arrives one cycle
        # after the beat); a beat's sum is ready `lat` cycles after it
        ws = {(j, gi): delay(m, adv, w_in[j, gi], j, name="mws") for j in range(nv) for gi in range(G)}
        cs = {(j, d): delay(m, adv, lane[j, d], j, name="mcs") for j in range(nv) for d in range(hd)}
        # per (head, dimension) a chain of the multiply array's slices, one per slot (slot k's product
        # registered k cycles after slot 0's), the first adding -sum Z, the last accumulating the run in its P
        # (W = P; W = 0 on a run's first beat): the word's sum never leaves the cascade
        lat = nv + 1                          # a beat's sum is in the last slice's P `lat` cycles after it
        vv, valids = v1, [v1]
        for _ in range(lat - 1):
            vv = reg(m, adv, vv, name="mvt")
            valids.append(vv)
        v_acc, c_acc = valids[lat - 2], delay(m, adv, c1, lat - 2, name="mca")   # the beat entering the P
        cc = delay(m, adv, c1, lat - 1, name="mct")
        clear, last = cc[0], cc[1]
        for j in range(nv):
            for gi in range(G):
                m.d.comb += element(self.arr_d, j * G + gi, W_OUT).eq(ws[j, gi])
            for d in range(hd):
                m.d.comb += element(self.arr_b, j * hd + d, 16).eq(cs[j, d])
        m.d.comb += [self.arr_ce.eq(adv), self.arr_ce_tail.eq(adv & v_acc), self.arr_keep.eq(~c_acc[0])]
        accs = []
        for gi in range(G):
            for d in range(hd):
                m.d.comb += element(self.arr_c, gi * hd + d, P_BITS).eq(nz[gi])
                acc = self._wide_acc(m, adv & vv, clear, element(self.arr_p, gi * hd + d, P_BITS), acc_bits(cfg),
                                     f"{gi}_{d}")
                accs.append(Cat(acc, acc[-1].replicate(ACC_BITS - len(acc))))     # sign-extended
        with m.If(adv):
            m.d.sync += self.o.valid.eq(vv & last)
        m.d.comb += self.o.payload.acc.eq(Cat(*accs))
        busy = 0
        for v in valids:
            busy = busy | v
        m.d.comb += self.busy.eq(busy)
        return m

    @staticmethod
    def _wide_acc(m, en, clear, p, bits, tag):
        """The `bits`-bit accumulator of a run whose low 48 bits wrap inside a slice's P: acc = hi * 2^48 + lo,
        lo = P (unsigned), hi counting P's wraps modulo 2^(bits - 48) (exact while |acc| < 2^(bits - 1)). A
        beat changes P by less than 2^46 (BEAT_SUM_BOUND), so P's top two bits step 11 -> 00 exactly when it wrapped upwards and 00 -> 11 when downwards; on a run's
        first beat (P = the beat's sum) hi is P's sign. Registered on the beat after P (`en`)."""
        hi = Signal(signed(bits - P_BITS), name=f"acc_hi_{tag}")
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


def MacBlock(cfg: DatapathConfig) -> UnitOnArray:
    """The value MAC on an array of its own (hw/macarray.UnitOnArray)."""
    return UnitOnArray(ValueMac(cfg), "mac")
