"""One DSP48E2 (UltraScale+ DSP slice, UG579) in the multiply-add form the datapath uses:

    M <= A * B                              (MREG, clock enable ce_m)
    P <= (P if keep_p else 0) + M + (C | PCIN)   (PREG, clock enable ce_p; 48 bits, wrapping)

A is 27 bits signed, B 18 bits signed; the addend is the C port (chain head) or PCIN (the previous slice's
PCOUT, the dedicated cascade). `accumulate` slices feed their own P back (OPMODE W = P) while `keep_p` is
set: an accumulator inside the slice instead of one in fabric.

Why explicit: yosys' DSP packer only knows the DSP48E1's adder (no W multiplexer), so `P + M + PCIN` would
stay in fabric in the estimates, and the accumulator is written so that Vivado maps it exactly as built.
The component elaborates to the `DSP48E2` primitive when the platform asks for primitives (synthesis: the
Vitis kernel, hw/synth_report.py; `PRIMITIVES`), and otherwise (simulation: Verilator, Amaranth's
simulator) to a behavioural model of the same configuration, decoded from the same OPMODE value.
"""
from __future__ import annotations

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, Mux, ResetSignal, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

P_BITS = 48
A_BITS = 27        # the multiplier's A operand (AMULTSEL = "A")
B_BITS = 18

# OPMODE fields (UG579, "OPMODE"): W[8:7], Z[6:4], Y[3:2], X[1:0]
W_ZERO, W_P = 0b00, 0b01
Z_ZERO, Z_PCIN, Z_C = 0b000, 0b001, 0b011
XY_M = 0b0101                      # X = M and Y = M: the multiplier's two partial products
ALUMODE_SUM = 0b0000               # Z + W + X + Y + CIN
Z_SOURCES = {"c": Z_C, "pcin": Z_PCIN}


def opmode(w: int, z: int) -> int:
    return (w << 7) | (z << 4) | XY_M


class PlatformPrimitives:
    """The `platform` passed to elaboration (verilog.convert(..., platform=PRIMITIVES)) for synthesis:
    blocks that have a hand-placed primitive instantiate it."""
    xilinx_primitives = True


PRIMITIVES = PlatformPrimitives()


def wants_primitives(platform) -> bool:
    return bool(getattr(platform, "xilinx_primitives", False))


class MulAdd(wiring.Component):
    def __init__(self, z: str = "c", accumulate: bool = False):
        if z not in Z_SOURCES:
            raise ValueError(f"MulAdd z source {z!r}: use one of {sorted(Z_SOURCES)}")
        self.z, self.accumulate = z, bool(accumulate)
        ports = {
            "a": In(signed(A_BITS)), "b": In(signed(B_BITS)),
            "ce_m": In(1), "ce_p": In(1),
            "p": Out(signed(P_BITS)), "pcout": Out(P_BITS),
        }
        ports["c" if z == "c" else "pcin"] = In(P_BITS)
        if self.accumulate:
            ports["keep_p"] = In(1)
        super().__init__(ports)

    def opmode(self):
        """The OPMODE word: W = P while keep_p (accumulating slices), else 0; Z = the addend port; X, Y = M."""
        z = Z_SOURCES[self.z]
        if not self.accumulate:
            return Const(opmode(W_ZERO, z), 9)
        return Mux(self.keep_p, opmode(W_P, z), opmode(W_ZERO, z))

    def elaborate(self, platform):
        m = Module()
        op = self.opmode()
        addend = self.c if self.z == "c" else self.pcin
        if wants_primitives(platform):
            self._primitive(m, op, addend)
        else:
            self._model(m, op, addend)
        return m

    def _model(self, m, op, addend):
        """The slice as `_primitive` configures it: W decoded from `op` (its one run-time field), Z the
        slice's one addend port."""
        mreg = Signal(signed(A_BITS + B_BITS), name="mreg")
        preg = Signal(signed(P_BITS), name="preg")
        with m.If(self.ce_m):
            m.d.sync += mreg.eq(self.a * self.b)
        with m.If(self.ce_p):
            m.d.sync += preg.eq(Mux(op[7:9] == W_P, preg, 0) + mreg + addend.as_signed())
        m.d.comb += [self.p.eq(preg), self.pcout.eq(preg)]

    def _primitive(self, m, op, addend):
        zero = lambda n: Const(0, n)
        rst = ResetSignal("sync")
        m.submodules.dsp = Instance(
            "DSP48E2",
            a_pmkvq_explicit=1,       # hw/synth_report.py's DSP packer leaves these slices alone
            p_A_INPUT="DIRECT", p_B_INPUT="DIRECT", p_AMULTSEL="A", p_BMULTSEL="B", p_PREADDINSEL="A",
            p_USE_MULT="MULTIPLY", p_USE_SIMD="ONE48", p_USE_PATTERN_DETECT="NO_PATDET",
            p_AREG=0, p_ACASCREG=0, p_BREG=0, p_BCASCREG=0, p_CREG=0, p_DREG=0, p_ADREG=0,
            p_MREG=1, p_PREG=1, p_OPMODEREG=0, p_ALUMODEREG=0, p_INMODEREG=0,
            p_CARRYINREG=0, p_CARRYINSELREG=0,
            i_CLK=ClockSignal("sync"),
            i_A=Cat(self.a, self.a[-1].replicate(30 - A_BITS)), i_B=self.b,
            i_C=addend if self.z == "c" else zero(P_BITS),
            i_PCIN=addend if self.z == "pcin" else zero(P_BITS),
            i_D=zero(27), i_ACIN=zero(30), i_BCIN=zero(18), i_CARRYCASCIN=0, i_MULTSIGNIN=0,
            i_OPMODE=op, i_ALUMODE=Const(ALUMODE_SUM, 4), i_INMODE=zero(5),
            i_CARRYIN=0, i_CARRYINSEL=zero(3),
            i_CEM=self.ce_m, i_CEP=self.ce_p,
            i_CEA1=0, i_CEA2=0, i_CEB1=0, i_CEB2=0, i_CEC=0, i_CED=0, i_CEAD=0,
            i_CECTRL=0, i_CEINMODE=0, i_CEALUMODE=0, i_CECARRYIN=0,
            i_RSTM=rst, i_RSTP=rst,
            i_RSTA=0, i_RSTB=0, i_RSTC=0, i_RSTD=0, i_RSTCTRL=0, i_RSTINMODE=0, i_RSTALUMODE=0,
            i_RSTALLCARRYIN=0,
            o_P=self.p, o_PCOUT=self.pcout,
        )
