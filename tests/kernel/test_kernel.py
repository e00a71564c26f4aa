"""Host-style tests of the whole kernel on Verilator (sim/tb_kernel.py): registers over AXI4-Lite, data in
AXI RAM models, random stalls on every AXI channel, partial records bit-exact against the golden model."""
import pytest

from pmkvq_accel.sim import runner
from pmkvq_accel.sim.kernel_build import build_kernel


CASES = {
    "hd64_g3_e1": (dict(engines=1, head_dim=64, groups=3), [
        dict(n_heads=2, n_sink=1, n_body=256, n_window=40, k_bits=2, v_bits=4),
        dict(n_heads=1, n_sink=1, n_body=0, n_window=1, k_bits=16, v_bits=16),
        dict(n_heads=3, n_sink=1, n_body=128, n_window=128, k_bits=8, v_bits=2, outliers=True),
        dict(n_heads=1, n_sink=0, n_body=37, n_window=0, k_bits=4, v_bits=16),
    ], 0.3),
    # two engines, each on its own AXI port and RAM: heads split across them
    "hd64_g1_e2": (dict(engines=2, head_dim=64, groups=1), [
        dict(n_heads=3, n_sink=1, n_body=300, n_window=17, k_bits=4, v_bits=2),
        dict(n_heads=1, n_sink=1, n_body=64, n_window=128, k_bits=16, v_bits=8),
    ], 0.2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_attention(name, tmp_path):
    """Several launches back to back, random stalls on every AXI channel."""
    params, cases, stalls = CASES[name]
    bdir = build_kernel(**params)
    runner.run(bdir, "pmkvq_accel.sim.tb_kernel", tmp_path, {**params, "cases": cases, "stalls": stalls},
               toplevel="pmkvq_attn", testcase="run_attention")


def test_kernel_bad_arguments_end_with_a_status(tmp_path):
    bdir = build_kernel()
    runner.run(bdir, "pmkvq_accel.sim.tb_kernel", tmp_path, {"engines": 1}, toplevel="pmkvq_attn",
               testcase="run_bad_arguments")


def test_kernel_shrink_copy_then_attention(tmp_path):
    bdir = build_kernel()
    runner.run(bdir, "pmkvq_accel.sim.tb_kernel", tmp_path, {"engines": 1, "stalls": 0.2}, toplevel="pmkvq_attn",
               testcase="run_shrink_copy_attention")
