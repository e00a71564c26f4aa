"""Small arithmetic building blocks shared by the datapath blocks (docs/numerics.md notation).

Every helper adds combinational logic to module `m` and returns a Value/Signal. `reg` makes one
pipeline register that loads when `adv` (the block's advance/enable) is high.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from pmkvq_accel.model.formats import BF16_EXP_BIAS, BF16_SUBNORMAL_EXP

def _name(m, prefix):
    """A fresh signal name, numbered per module `m` (so the Verilog of a block does not depend on what was
    elaborated before it in the same process)."""
    n = getattr(m, "_arith_names", 0) + 1
    m._arith_names = n
    return f"{prefix}_{n}"


def comb(m, value, shape=None, name="t"):
    s = Signal(shape if shape is not None else value.shape(), name=_name(m, name))
    m.d.comb += s.eq(value)
    return s


def reg(m, adv, value, shape=None, name="r", domain="sync", init=0):
    s = Signal(shape if shape is not None else value.shape(), name=_name(m, name), init=init)
    with m.If(adv):
        m.d[domain] += s.eq(value)
    return s


def bf16_fields(m, bits16):
    """bf16 pattern -> (signed mantissa m, exponent x), value m * 2^x (numerics.md section 1)."""
    e = bits16[7:15]
    frac = bits16[0:7]
    normal = e != 0
    mag = comb(m, Mux(normal, Cat(frac, Const(1, 1)), frac), unsigned(8), "mag")
    mant = comb(m, Mux(bits16[15], -mag, mag), signed(9), "mant")
    exp = comb(m, Mux(normal, e - BF16_EXP_BIAS, BF16_SUBNORMAL_EXP), signed(10), "exp")
    return mant, exp


def kept(m, value, shape=None, name="k"):
    """A combinational signal with the `keep` attribute: the LUT mapper (yosys abc9 here, Vivado likewise)
    keeps it as a LUT output. Used at the levels of shifters and reductions so that their depth stays
    log-structured; otherwise area recovery re-maps off-critical cones into deep chains of small LUTs."""
    s = Signal(shape if shape is not None else value.shape(), name=_name(m, name), attrs={"keep": 1})
    m.d.comb += s.eq(value)
    return s


def any_tree(m, terms, first=6, name="any"):
    """OR of 1-bit terms as a tree of kept LUTs: `first` terms per LUT at the first level (3 when each term
    is itself a 2-input function), 6 per LUT above."""
    terms, per = list(terms), first
    while len(terms) > 1:
        terms = [kept(m, Cat(*terms[i:i + per]).any(), 1, name) for i in range(0, len(terms), per)]
        per = 6
    return terms[0] if terms else Const(0, 1)


def select_update(m, target, cases, name="su"):
    """target <= the value of the one event that holds (`cases`: (event, value), events mutually exclusive;
    none: target holds), as an AND-OR of kept LUTs: the events and values kept, three (event, value) pairs
    per LUT and bit, the register's enable the OR of the events. Written as nested conditions, such an
    update came out of ABC as a chain of 2-input LUTs."""
    evs = [kept(m, ev, unsigned(1), name + "_ev") for ev, _ in cases]
    vals = [kept(m, v, target.shape(), name + "_c") for _, v in cases]
    parts = []
    for i in range(0, len(cases), 3):
        terms = [v & e.replicate(len(target)) for e, v in zip(evs[i:i + 3], vals[i:i + 3])]
        acc = terms[0]
        for t in terms[1:]:
            acc = acc | t
        parts.append(kept(m, acc, target.shape(), name + "_p"))
    nxt = parts[0]
    for p in parts[1:]:
        nxt = nxt | p
    with m.If(kept(m, Cat(*evs).any(), unsigned(1), name + "_en")):
        m.d.sync += target.eq(nxt)


def clamp_u(m, k, hi, name="kc"):
    """clamp(k, 0, hi) for a signed k, as an unsigned signal, from the bits (no compare chains):
    the sign bit, an OR of the high bits and one small compare of the low bits."""
    p = max(1, hi.bit_length())
    n = len(k)
    sign = k[n - 1]
    if n - 1 <= p:
        over = comb(m, ~sign & (k[0:n - 1] > hi), 1, name + "_o")
    else:
        over = comb(m, ~sign & (any_tree(m, k[p:n - 1], name=name + "_h") | (k[0:p] > hi)), 1, name + "_o")
    return kept(m, Mux(sign, 0, Mux(over, hi, k[0:p])), unsigned(p), name)


def shift_amount(m, adv, ka, hi, name="sa"):
    """First half of rshr(x, k), one pipeline stage before the shift: register sa = clamp(ka, 0, hi) for
    `shift_round_by`, where ka = k + lmax and hi = kmax + lmax (callers fold lmax into k).

    Callers pick kmax so that any larger k gives the same result (|x| < 2^(kmax-1)) and guarantee
    k >= -lmax.
    """
    return reg(m, adv, clamp_u(m, ka, hi, name + "_c"), name=name)


def shift_round_by(m, x, sa, lmax=0, nout=None, name="sr"):
    """rshr(x, sa - lmax) for a pre-clamped unsigned amount `sa` (`shift_amount`), without compares:

        rshr(x, k) = (((x << (lmax + 1)) >> (k + lmax)) + 1) >> 1

    (for k >= 1 the shifted value is floor(x / 2^(k-1)); for k <= 0 it is x << (1 - k), whose low bit
    is zero, so the rounding add is exact). One barrel shifter and one incrementer. `nout`: only the low
    nout bits of the result are used (the rest are not built).
    """
    xs = x.as_signed() if not x.shape().signed else x
    wide = signed(len(x) + lmax + 1)
    y = barrel(m, comb(m, xs << (lmax + 1), wide, name + "_x"), sa, right=True,
               nout=None if nout is None else nout + 1, name=name + "_y")
    if nout is not None:
        return comb(m, (y[0:nout + 1] + 1) >> 1, unsigned(nout), name)
    return comb(m, (y + 1) >> 1, wide, name)


def barrel(m, x, amount, right, nout=None, unit=0, name="bs"):
    """x >> (amount << unit) (arithmetic) or x << (amount << unit), same width as x, built from 4:1
    multiplexers (two amount bits per level: one LUT6 per output bit and level). Each level is a kept
    signal, so the LUT mapper keeps this structure (log4 levels, `kept`).
    For a right shift only the low `nout` result bits are built (the rest are zero)."""
    n = len(x)
    sgn = x[n - 1] if x.shape().signed else Const(0, 1)
    levels = list(range(0, len(amount), 2))
    need = []                     # bits each level must produce (a right shift only looks upward)
    k = n if nout is None or not right else min(n, nout)
    for lv in reversed(levels):
        need.append(k)
        k = min(n, k + (((1 << min(2, len(amount) - lv)) - 1) << (lv + unit)))
    need.reverse()
    cur = x
    for lv, nb in zip(levels, need):
        sel = amount[lv:lv + 2]
        bits = []
        for i in range(nb):
            taps = []
            for s in range(1 << len(sel)):
                d = s << (lv + unit)
                src = i + d if right else i - d
                taps.append(cur[src] if 0 <= src < n else (sgn if right else Const(0, 1)))
            while len(taps) > 1:          # binary mux tree on the select bits, low bit first
                taps = [Mux(sel[len(sel) - (len(taps).bit_length() - 1)], taps[t + 1], taps[t])
                        for t in range(0, len(taps), 2)]
            bits.append(taps[0])
        cur = kept(m, Cat(*bits), x.shape(), name)
    return cur


def sat_flags(m, x, limit_bits, name="sf"):
    """(x > 2^L - 1, x < -(2^L - 1)) for signed x with L = limit_bits, from the bits alone (no compare chain):
    x >= 2^L when x >= 0 and a bit at or above L is set; x <= -2^L when x < 0 and either not all bits at or
    above L are ones or all bits below L are zero (x == -2^L)."""
    n = len(x)
    if limit_bits >= n:
        return Const(0, 1), Const(0, 1)
    sign = x[n - 1]
    hi = x[limit_bits:n - 1]                  # empty when limit_bits == n - 1
    hi_any = any_tree(m, hi, name=name + "_ha")
    hi_all = ~any_tree(m, ~hi, name=name + "_hl")
    lo_any = any_tree(m, x[0:limit_bits], name=name + "_la")
    return (comb(m, ~sign & hi_any, 1, name + "_p"),
            comb(m, sign & (~hi_all | ~lo_any), 1, name + "_n"))


def _clip(m, x, pos, neg, limit_bits, name):
    lim = (1 << limit_bits) - 1
    out = Signal(signed(limit_bits + 1), name=_name(m, name))
    m.d.comb += out.eq(Mux(pos, lim, Mux(neg, -lim, x[0:limit_bits + 1].as_signed())))
    return out


def saturate(m, x, limit_bits, name="sat"):
    """sat_L(x): clip signed x to [-(2^L - 1), 2^L - 1] (L = limit_bits)."""
    pos, neg = sat_flags(m, x, limit_bits, name + "_f")
    return _clip(m, x, pos, neg, limit_bits, name)


def shift_sat_ctl(m, adv, km1, nk, kmax, limit_bits, xbits, name="ssc"):
    """First half of sat_L(rshr(x, k)) for signed x of `xbits` bits, as two pipeline stages ahead of the
    shift, from km1 = k - 1 and nk = -k (registered by the caller). Returns the registered fields
    (right, krm1, ls, mask), valid two stages after km1/nk:

      stage 1: right = k > 0 (the sign of nk), krm1 = clamp(k, 1, kmax) - 1, ls = clamp(-k, 0, L)
      stage 2: mask[i] = (i + ls >= L), the bits of x that leave [-(2^L - 1), 2^L - 1] when x is shifted
               left by ls, as -(1 << (L - ls)): a one-hot decode and one carry chain (with mask m,
               x << ls overflows iff x >= 0 and x & m != 0, or x < 0 and (x | ~m) is not all ones or
               x & ~m == 0)
    """
    right = reg(m, adv, nk[len(nk) - 1], name=name + "_r")
    krm1 = reg(m, adv, clamp_u(m, km1, kmax - 1, name + "_kr"), name=name + "_k")
    ls = reg(m, adv, clamp_u(m, nk, limit_bits, name + "_ls"), name=name + "_l")
    onehot = Cat(*[ls == limit_bits - i for i in range(xbits)])
    mask = reg(m, adv, -onehot, unsigned(xbits), name=name + "_m")
    return (reg(m, adv, right, name=name + "_r2"), reg(m, adv, krm1, name=name + "_k2"),
            reg(m, adv, ls, name=name + "_l2"), mask)


def shift_round_sat_by(m, adv, x, ctl, limit_bits, name="srs"):
    """sat_L(rshr(x, k)) from the registered `shift_sat_ctl` fields, in two stages (one register inside;
    the result is combinational at the end of the second stage):

      stage 1: the coarse shifts (amount bits 2 and up) of the right shift and the left shift, and the
               left shift's overflow from the mask
      stage 2: the fine shifts (amount bits 0-1), the rounding increment of the right shift, one select

    The right shift never leaves the range."""
    right, krm1, ls, mask = ctl
    lim = (1 << limit_bits) - 1
    xs = x.as_signed() if not x.shape().signed else x
    n = len(x)
    sign = xs[n - 1]
    xu = xs.as_unsigned()
    pos_ovf = any_tree(m, xu & mask, 3, name + "_po")
    hi_ones = ~any_tree(m, ~xu & mask, 3, name + "_ho")
    lo_zero = ~any_tree(m, xu & ~mask, 3, name + "_lz")
    ovf = reg(m, adv, Mux(sign, ~hi_ones | lo_zero, pos_ovf), 1, name + "_o")
    r1 = reg(m, adv, barrel(m, xs, krm1[2:], right=True, unit=2, name=name + "_rc"), name=name + "_r1")
    l1 = reg(m, adv, barrel(m, comb(m, xs, signed(limit_bits + 1), name + "_x"), ls[2:], right=False, unit=2,
                            name=name + "_lc"), name=name + "_l1")
    right2, sign2 = reg(m, adv, right, name=name + "_rt"), reg(m, adv, sign, name=name + "_sg")
    kf, lf = reg(m, adv, krm1[0:2], name=name + "_kf"), reg(m, adv, ls[0:2], name=name + "_lf")
    r = comb(m, (barrel(m, r1, kf, right=True, name=name + "_rs") + 1) >> 1, signed(n + 1), name + "_r")
    left = barrel(m, l1, lf, right=False, name=name + "_l")
    out = Signal(signed(limit_bits + 1), name=_name(m, name))
    m.d.comb += out.eq(Mux(right2, r, Mux(ovf, Mux(sign2, -lim, lim), left)))
    return out


def max_tree(m, items, shape=None, name="mx"):
    """Maximum of signed values as a tree of pairwise compare-and-select (log2 levels, combinational)."""
    items = list(items)
    shape = shape if shape is not None else items[0].shape()
    while len(items) > 1:
        items = [comb(m, Mux(items[i + 1] > items[i], items[i + 1], items[i]), shape, name)
                 if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def tree_sum(m, adv, items, per_stage=2, name="tree"):
    """Pipelined adder tree: `per_stage` adder levels per register stage. Returns (sum, latency)."""
    items = list(items)
    lat = 0
    level = 0
    while len(items) > 1:
        nxt = []
        for i in range(0, len(items), 2):
            if i + 1 < len(items):
                a, b = items[i], items[i + 1]
                w = max(len(a), len(b)) + 1
                sgn = a.shape().signed or b.shape().signed
                nxt.append(comb(m, a + b, signed(w + (0 if sgn else 0)) if sgn else unsigned(w), name))
            else:
                nxt.append(items[i])
        items = nxt
        level += 1
        if level % per_stage == 0 and len(items) > 1:
            items = [reg(m, adv, v, name=name + "_p") for v in items]
            lat += 1
    return items[0], lat


def delay(m, adv, value, n, name="dl"):
    """`value` delayed by n register stages (reset-less, so synthesis maps long delays to shift-register
    LUTs (SRL16/SRL32) and DSP input registers)."""
    for _ in range(n):
        s = Signal(value.shape(), name=_name(m, name), reset_less=True)
        with m.If(adv):
            m.d.sync += s.eq(value)
        value = s
    return value


class DelayLine(wiring.Component):
    """A stream without back-pressure delayed by `stages` register stages (valid and payload; the registers
    reset, so the valid chain starts empty)."""

    def __init__(self, layout, stages: int):
        if stages < 0:
            raise ValueError(f"a delay line of {stages} stages")
        self.stages = stages
        sig = stream.Signature(layout, always_ready=True)
        super().__init__({"i": In(sig), "o": Out(sig)})

    def elaborate(self, platform):
        m = Module()
        v, p = self.i.valid, self.i.payload
        for k in range(self.stages):
            nv, np_ = Signal(name=f"dly_v{k}"), Signal(self.i.payload.shape(), name=f"dly_p{k}")
            m.d.sync += [nv.eq(v), np_.eq(p)]
            v, p = nv, np_
        m.d.comb += [self.o.valid.eq(v), self.o.payload.eq(p)]
        return m
