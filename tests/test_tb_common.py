"""sim/tb_common.py: TB.recv honours timeout_cycles (it used to accept it and wait for ever)."""
import pytest

from pmkvq_accel.sim import runner


def three_items():
    from amaranth import Module, Signal
    from amaranth.lib import stream, wiring
    from amaranth.lib.wiring import Out

    class ThreeItems(wiring.Component):
        o: Out(stream.Signature(8))

        def elaborate(self, platform):
            m = Module()
            n = Signal(2)
            m.d.comb += [self.o.payload.eq(n), self.o.valid.eq(n != 3)]
            with m.If(self.o.valid & self.o.ready):
                m.d.sync += n.eq(n + 1)
            return m
    return ThreeItems()


@pytest.mark.slow
def test_recv_times_out(tmp_path):
    bdir = runner.build("tb_recv_timeout", three_items, {})
    runner.run(bdir, "tb_recv_timeout", tmp_path, {})
