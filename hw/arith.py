"""Small arithmetic building blocks shared by the datapath blocks (docs/numerics.md notation).

Every helper adds combinational logic to module `m` and returns a Value/Signal. `reg` makes one
pipeline register that loads when `adv` (the block's advance/enable) is high.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Mux, Signal, signed, unsigned

_count = [0]


def _name(prefix):
    _count[0] += 1
    return f"{prefix}_{_count[0]}"


def comb(m, value, shape=None, name="t"):
    s = Signal(shape if shape is not None else value.shape(), name=_name(name))
    m.d.comb += s.eq(value)
    return s


def reg(m, adv, value, shape=None, name="r", domain="sync"):
    s = Signal(shape if shape is not None else value.shape(), name=_name(name))
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
    exp = comb(m, Mux(normal, e - 134, -133), signed(10), "exp")
    return mant, exp


def clamp_u(m, k, lo, hi, name="kc"):
    """Clamp a signed value to [lo, hi] (0 <= lo <= hi) and return it as an unsigned signal."""
    out = Signal(unsigned(max(1, hi.bit_length())), name=_name(name))
    with m.If(k < lo):
        m.d.comb += out.eq(lo)
    with m.Elif(k > hi):
        m.d.comb += out.eq(hi)
    with m.Else():
        m.d.comb += out.eq(k)
    return out


def shift_round(m, x, k, kmax, lmax=0, name="sr"):
    """rshr(x, k): (x + 2^(k-1)) >> k for k > 0, x << -k for k <= 0 (numerics.md).

    k is clamped to [-lmax, kmax]; callers pick kmax so that any larger k gives the same result
    (|x| < 2^(kmax-1)), and guarantee k >= -lmax.
    """
    kr = clamp_u(m, k, 1, kmax, name + "_kr")
    krm1 = comb(m, kr - 1, unsigned(len(kr)), name + "_krm1")
    xs = x.as_signed() if not x.shape().signed else x
    right = comb(m, ((xs >> krm1) + 1) >> 1, signed(len(x) + 1), name + "_r")
    if lmax == 0:
        return comb(m, Mux(k > 0, right, xs), signed(len(x) + 1), name)
    ls = clamp_u(m, -k, 0, lmax, name + "_ls")
    left = comb(m, xs << ls, signed(len(x) + 1 + lmax), name + "_l")
    return comb(m, Mux(k > 0, right, left), signed(len(x) + 1 + lmax), name)


def shift_round_sat(m, x, k, kmax, limit_bits, name="srs"):
    """sat_limit(rshr(x, k)) for any k: a left shift beyond the range saturates (numerics.md section 5).

    x is signed with |x| < 2^(kmax - 2); results for k > kmax equal those at kmax.
    """
    lim = (1 << limit_bits) - 1
    right = shift_round(m, x, k, kmax, 0, name + "_rt")
    ls = clamp_u(m, -k, 0, limit_bits, name + "_ls")   # ls == limit_bits: any nonzero x saturates
    left = comb(m, x << ls, signed(len(x) + limit_bits + 1), name + "_lft")
    out = Signal(signed(limit_bits + 1), name=_name(name))
    val = comb(m, Mux(k > 0, right, left), signed(len(x) + limit_bits + 1), name + "_v")
    with m.If(val > lim):
        m.d.comb += out.eq(lim)
    with m.Elif(val < -lim):
        m.d.comb += out.eq(-lim)
    with m.Else():
        m.d.comb += out.eq(val)
    return out


def saturate(m, x, limit_bits, name="sat"):
    lim = (1 << limit_bits) - 1
    out = Signal(signed(limit_bits + 1), name=_name(name))
    with m.If(x > lim):
        m.d.comb += out.eq(lim)
    with m.Elif(x < -lim):
        m.d.comb += out.eq(-lim)
    with m.Else():
        m.d.comb += out.eq(x)
    return out


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
