"""cocotb bench for tests/test_tb_common.py: TB.recv's timeout_cycles on a source that sends 3 items and stops."""
import cocotb
from cocotb.triggers import Timer, with_timeout
from cocotb.utils import get_sim_time

from pmkvq_accel.sim.tb_common import TB


@cocotb.test()
async def test_recv_timeout(dut):
    tb = TB(dut, sinks=("o",))
    await tb.reset()
    got = await tb.recv("o", 3, timeout_cycles=200)
    assert got == [0, 1, 2], got
    t0 = get_sim_time("ns")
    try:
        # the outer timeout fails the bench (SimTimeoutError) if recv ignores timeout_cycles
        await with_timeout(tb.recv("o", 1, timeout_cycles=100), 1000 * tb.clock_ns, "ns")
    except AssertionError as e:
        assert "after 100 cycles" in str(e), str(e)
    else:
        raise AssertionError("recv returned although the source sends nothing more")
    waited = get_sim_time("ns") - t0
    assert 100 * tb.clock_ns <= waited <= 101 * tb.clock_ns, waited
    await Timer(10, "ns")
