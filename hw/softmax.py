"""Softmax weights (value pass): the exp2 unit and the per-token value weights
(docs/numerics.md sections 6-7).

    x = M - score;  n = x >> 16;  i = (x >> 8) & 0xFF;  r = x & 0xFF
    v = T[i] - (((T[i] - T[i+1]) * r + 128) >> 8);   p = rshr(v, min(n, 62))
    W = rshr(p * ms, E + W_SHIFT_BIAS - xs - b);   Z = rshr(p * mz, E + Z_SHIFT_BIAS - xz)   (model/formats.py)

The table ROM is generated from `pmkvq_accel.model.attention.EXP2_TABLE`: one ROM per lane with a
synchronous read port and `rom_style = "block"`, so each maps to a block RAM instead of LUTs. `p`, `W` and `Z` come out per token lane and query head.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from pmkvq_accel.model.attention import EXP2_TABLE
from pmkvq_accel.model.formats import W_SHIFT_BIAS, Z_SHIFT_BIAS

from .arith import bf16_fields, comb, reg, shift_amount, shift_round_by
from .config import DatapathConfig, by_width

P_BITS = 33     # p in [0, 2^32]
W_OUT = 27      # W < 2^26, carried signed
Z_OUT = 44      # |Z| < 2^42
LATENCY = 6     # register stages from `i` to `o` (checked against the stages built, in elaborate)
E_STAGE = 4     # the stage whose logic reads the input `e` (attention.py asserts E is final by then)
Z_LMAX = -Z_SHIFT_BIAS   # the largest left shift of Z's rshr (E >= xz), folded into its amount


def exp2_rom_init():
    t = [int(v) for v in EXP2_TABLE]
    return [t[i] | ((t[i] - t[i + 1]) << 33) for i in range(256)]


class WeightUnit(wiring.Component):
    def __init__(self, cfg: DatapathConfig, tag_width: int = 1):
        if not isinstance(cfg, DatapathConfig):
            raise TypeError(f"WeightUnit needs a DatapathConfig, got {cfg!r}")
        self.cfg = cfg
        nv, G = cfg.value_slots, cfg.groups     # the value pass's token lanes
        self.i_layout = data.StructLayout({
            "score": unsigned(nv * G * 32),   # lane (j, g) at (j*G + g)*32, signed
            "vmeta": unsigned(nv * 32),       # value scale | zero << 16 per token lane
            "lb": unsigned(2),
            "ntok": unsigned(cfg.field_bits["ntok"]),
            "tag": unsigned(tag_width),
        })
        self.o_layout = data.StructLayout({
            "p": unsigned(nv * G * P_BITS),
            "w": unsigned(nv * G * W_OUT),
            "z": unsigned(nv * G * Z_OUT),
            "ntok": unsigned(cfg.field_bits["ntok"]),
            "tag": unsigned(tag_width),
        })
        super().__init__({
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
            "m": In(G * 32),     # run maximum per head, signed
            "e": In(12),         # value magnitude exponent E, signed
        })

    def elaborate(self, platform):
        cfg = self.cfg
        nv, G = cfg.value_slots, cfg.groups
        m = Module()
        adv = Signal()
        m.d.comb += [adv.eq(~self.o.valid | self.o.ready), self.i.ready.eq(adv)]
        p = self.i.payload
        E = self.e.as_signed()
        init = exp2_rom_init()

        ctl = Cat(p.vmeta, p.lb, p.ntok, p.tag)
        v1 = reg(m, adv, self.i.valid, name="wv1")
        c1 = reg(m, adv, ctl, name="wc1")
        xs1 = {}
        for j in range(nv):
            for gi in range(G):
                sc = p.score[(j * G + gi) * 32:(j * G + gi + 1) * 32].as_signed()
                mx = self.m[gi * 32:(gi + 1) * 32].as_signed()
                x = comb(m, mx - sc, signed(34), "x")
                xs1[j, gi] = reg(m, adv, Mux(x < 0, 0, x), unsigned(33), name="x1")

        # stage 2: ROM read (synchronous, enabled with the pipeline)
        v2 = reg(m, adv, v1, name="wv2")
        c2 = reg(m, adv, c1, name="wc2")
        stage2 = {}
        for j in range(nv):
            for gi in range(G):
                x = xs1[j, gi]
                rom = Memory(shape=unsigned(57), depth=256, init=init, attrs={"rom_style": "block"})
                m.submodules[f"exp2_rom_{j}_{gi}"] = rom
                rp = rom.read_port()
                m.d.comb += [rp.addr.eq(x[8:16]), rp.en.eq(adv)]
                n = comb(m, x[16:33], unsigned(17), "n")
                nc = comb(m, Mux(n > 34, 34, n), unsigned(6), "nc")
                stage2[j, gi] = (rp.data, reg(m, adv, x[0:8], name="r2"), reg(m, adv, nc, name="n2"))

        # stage 3: linear interpolation
        v3 = reg(m, adv, v2, name="wv3")
        c3 = reg(m, adv, c2, name="wc3")
        stage3 = {}
        for (j, gi), (rd, r, n) in stage2.items():
            t = rd[0:33]
            dl = rd[33:57]
            v = comb(m, t - ((dl * r + 128) >> 8), signed(35), "v")
            stage3[j, gi] = (reg(m, adv, v[0:33], name="v3"), reg(m, adv, n, name="n3"))

        # stage 4: p = rshr(v, n), n <= 34 already clamped
        v4 = reg(m, adv, v3, name="wv4")
        c4 = reg(m, adv, c3, name="wc4")
        stage4 = {}
        for (j, gi), (v, n) in stage3.items():
            pv = shift_round_by(m, Cat(v, 0).as_signed(), n, 0, 33, "p")
            stage4[j, gi] = reg(m, adv, pv[0:33], name="p4")
        # the W/Z shift amounts from the metadata and E (E is read from this stage on: E_STAGE)
        vmeta3 = c3[0:nv * 32]
        lb3 = c3[nv * 32:nv * 32 + 2]
        bits3 = comb(m, by_width(lb3, lambda w: w.bits), unsigned(5), "bits")
        k4, mant4 = {}, {}
        for j in range(nv):
            ms, xs = bf16_fields(m, vmeta3[j * 32:j * 32 + 16])
            mz, xz = bf16_fields(m, vmeta3[j * 32 + 16:j * 32 + 32])
            # the mantissas registered here, so stage 5's products start from registers (no negation before them)
            mant4[j] = (reg(m, adv, ms, name="ms4"), reg(m, adv, mz, name="mz4"))
            k4[j] = (reg(m, adv, E + W_SHIFT_BIAS - xs - bits3, signed(14), name="kw4"),
                     reg(m, adv, E + Z_SHIFT_BIAS + Z_LMAX - xz, signed(14), name="kz4"))   # lmax folded in

        # stage 5: p * ms, p * mz; the shift amounts clamped (arith.shift_amount)
        v5 = reg(m, adv, v4, name="wv5")
        c5 = reg(m, adv, c4[nv * 32 + 2:], name="wc5")
        stage5 = {}
        p5 = {}
        sa5 = {j: (shift_amount(m, adv, kw, 43, "saw"), shift_amount(m, adv, kz, 45 + Z_LMAX, "saz"))
               for j, (kw, kz) in k4.items()}
        for j in range(nv):
            ms, mz = mant4[j]
            for gi in range(G):
                # p (33 bits, <= 2^32) * a 9-bit mantissa: two DSP48E2 tiles each (27 x 18 and 7 x 9) and
                # their sum; DSPs are what the card has to spare, LUTs what bounds its engine count
                pv = stage4[j, gi]
                stage5[j, gi] = (reg(m, adv, pv * ms, signed(44), name="pm"),
                                 reg(m, adv, pv * mz, signed(44), name="pz"),
                                 sa5[j][0], sa5[j][1])
                p5[j, gi] = reg(m, adv, stage4[j, gi], name="p5")

        # the stages as built: the valid chain v1..v5 and the output register; E is read after c1..c3
        assert len((v1, v2, v3, v4, v5)) + 1 == LATENCY and len((c1, c2, c3)) + 1 == E_STAGE

        # stage 6: W and Z (shift and round only: the amounts were clamped one stage earlier)
        ws, zs, ps = [], [], []
        for j in range(nv):
            for gi in range(G):
                pm, pz, kw, kz = stage5[j, gi]
                ws.append(shift_round_by(m, pm, kw, 0, W_OUT, "w")[0:W_OUT])
                zs.append(shift_round_by(m, pz, kz, Z_LMAX, Z_OUT, "z")[0:Z_OUT])
                ps.append(p5[j, gi])
        ntok_w = cfg.field_bits["ntok"]
        with m.If(adv):
            m.d.sync += [
                self.o.valid.eq(v5),
                self.o.payload.p.eq(Cat(*ps)),
                self.o.payload.w.eq(Cat(*ws)),
                self.o.payload.z.eq(Cat(*zs)),
                self.o.payload.ntok.eq(c5[0:ntok_w]),
                self.o.payload.tag.eq(c5[ntok_w:]),
            ]
        return m
