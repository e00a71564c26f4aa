"""One DSP48E2 (UltraScale+ DSP slice, UG579) in the multiply-add forms the datapath uses:

    M <= (D if INMODE[2]) + (A unless INMODE[1])  times  B        (MREG, clock enable ce_m)
    P <= W + M + Z,  W in {0, P},  Z in {0, PCIN, C}               (PREG, clock enable ce_p; 48 bits, wrapping)

A and D are 27 bits signed (the pre-adder; only one of them is ever non-zero), B 18 bits signed. OPMODE and
INMODE are run-time inputs: the shared multiply array (hw/macarray.py) switches its slices between the
score chains (A x B, Z = PCIN) and the value chains (D x B, Z = C or PCIN, the chain's last slice
accumulating with W = P).

Why explicit: yosys' DSP packer only knows the DSP48E1's adder (no W multiplexer) and no run-time modes,
and the slices must be exactly as built for Vivado too. The component elaborates to the `DSP48E2` primitive
when the platform asks for primitives (synthesis: the Vitis kernel, hw/synth_report.py; `PRIMITIVES`), and
otherwise (simulation: Verilator, Amaranth's simulator) to a behavioural model of the same configuration that
decodes the same OPMODE and INMODE words.
"""
from __future__ import annotations

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, Mux, ResetSignal, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

P_BITS = 48
A_BITS = 27        # the pre-adder's A and D operands (AMULTSEL = "AD")
B_BITS = 18

# OPMODE fields (UG579, "OPMODE"): W[8:7], Z[6:4], Y[3:2], X[1:0]
W_ZERO, W_P = 0b00, 0b01
Z_ZERO, Z_PCIN, Z_C = 0b000, 0b001, 0b011
XY_M = 0b0101                      # X = M and Y = M: the multiplier's two partial products
ALUMODE_SUM = 0b0000               # Z + W + X + Y + CIN
# INMODE (UG579, "INMODE"): [1] gates A to 0 at the pre-adder, [2] enables D
INMODE_A = 0b00000                 # multiplier input A
INMODE_D = 0b00110                 # multiplier input D


def opmode(w: int, z: int) -> int:
    return (w << 7) | (z << 4) | XY_M


class PlatformPrimitives:
    """The `platform` passed to elaboration (verilog.convert(..., platform=PRIMITIVES)) for synthesis:
    blocks that have a hand-placed primitive instantiate it."""
    xilinx_primitives = True


PRIMITIVES = PlatformPrimitives()


def wants_primitives(platform) -> bool:
    return bool(getattr(platform, "xilinx_primitives", False))


class DspSlice(wiring.Component):
    """Ports: a, d (signed 27), b (signed 18), c, pcin (48), opmode (9), inmode (5), ce_m, ce_p; p and pcout
    (48; pcout only to the next slice's pcin)."""

    def __init__(self):
        super().__init__({
            "a": In(signed(A_BITS)), "d": In(signed(A_BITS)), "b": In(signed(B_BITS)),
            "c": In(P_BITS), "pcin": In(P_BITS), "opmode": In(9), "inmode": In(5),
            "ce_m": In(1), "ce_p": In(1),
            "p": Out(signed(P_BITS)), "pcout": Out(P_BITS),
        })

    def elaborate(self, platform):
        if wants_primitives(platform):
            return self._primitive()      # the instance itself: no wrapper module around each slice
        m = Module()
        self._model(m)
        return m

    def _model(self, m):
        """The slice as `_primitive` configures it, for the OPMODE/INMODE words above (W in {0, P}, Z in
        {0, PCIN, C}, X = Y = M; INMODE without subtraction or A1/B1)."""
        op, im = self.opmode, self.inmode
        mreg = Signal(signed(A_BITS + B_BITS), name="mreg")
        preg = Signal(signed(P_BITS), name="preg")
        pre = Signal(signed(A_BITS), name="preadd")
        m.d.comb += pre.eq(Mux(im[2], self.d, 0) + Mux(im[1], 0, self.a))
        with m.If(self.ce_m):
            m.d.sync += mreg.eq(pre * self.b)
        w = Mux(op[7:9] == W_P, preg, 0)
        z = Mux(op[4:7] == Z_C, self.c.as_signed(), Mux(op[4:7] == Z_PCIN, self.pcin.as_signed(), 0))
        with m.If(self.ce_p):
            m.d.sync += preg.eq(w + mreg + z)
        m.d.comb += [self.p.eq(preg), self.pcout.eq(preg)]

    def _primitive(self):
        zero = lambda n: Const(0, n)
        rst = ResetSignal("sync")
        return Instance(
            "DSP48E2",
            a_pmkvq_explicit=1,       # hw/synth_report.py's DSP packer leaves these slices alone
            p_A_INPUT="DIRECT", p_B_INPUT="DIRECT", p_AMULTSEL="AD", p_BMULTSEL="B", p_PREADDINSEL="A",
            p_USE_MULT="MULTIPLY", p_USE_SIMD="ONE48", p_USE_PATTERN_DETECT="NO_PATDET",
            p_AREG=0, p_ACASCREG=0, p_BREG=0, p_BCASCREG=0, p_CREG=0, p_DREG=0, p_ADREG=0,
            p_MREG=1, p_PREG=1, p_OPMODEREG=0, p_ALUMODEREG=0, p_INMODEREG=0,
            p_CARRYINREG=0, p_CARRYINSELREG=0,
            i_CLK=ClockSignal("sync"),
            i_A=Cat(self.a, self.a[-1].replicate(30 - A_BITS)), i_B=self.b, i_C=self.c, i_D=self.d,
            i_PCIN=self.pcin, i_ACIN=zero(30), i_BCIN=zero(18), i_CARRYCASCIN=0, i_MULTSIGNIN=0,
            i_OPMODE=self.opmode, i_ALUMODE=Const(ALUMODE_SUM, 4), i_INMODE=self.inmode,
            i_CARRYIN=0, i_CARRYINSEL=zero(3),
            i_CEM=self.ce_m, i_CEP=self.ce_p,
            i_CEA1=0, i_CEA2=0, i_CEB1=0, i_CEB2=0, i_CEC=0, i_CED=0, i_CEAD=0,
            i_CECTRL=0, i_CEINMODE=0, i_CEALUMODE=0, i_CECARRYIN=0,
            i_RSTM=rst, i_RSTP=rst,
            i_RSTA=0, i_RSTB=0, i_RSTC=0, i_RSTD=0, i_RSTCTRL=0, i_RSTINMODE=0, i_RSTALUMODE=0,
            i_RSTALLCARRYIN=0,
            o_P=self.p, o_PCOUT=self.pcout,
        )
