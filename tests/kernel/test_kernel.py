"""Host-style tests of the whole kernel on Verilator (tests/kernel/tb_kernel.py): registers over AXI4-Lite, each
engine's buffer in its own AXI RAM model, random stalls on every AXI channel, every engine's partial records
bit-exact against the golden model over its slice. One 128-bit build with two engines, engine 1 behind
SLR-crossing register stages (sim/kernel_build.shared_test_config, shared with tests/test_host_sim.py): the
memory layout depends on neither the word width nor the engine count."""
import pytest

from pmkvq_accel.sim import runner
from pmkvq_accel.sim.kernel_build import build_kernel, shared_test_config

_CFG = shared_test_config()
BUILD = dict(engines=_CFG.engines, pcs_per_engine=_CFG.pcs_per_engine, head_dim=_CFG.head_dim, groups=_CFG.groups,
             slr_stages=list(_CFG.slr_stages))
assert _CFG.slr_stages[1] > 0   # engine 1's master goes through SLR-crossing register stages

CASES = {
    # the context split across both engines, uneven slices, boundaries at any token
    "context_split": ([
        dict(n_heads=2, k_bits=2, v_bits=4, slices=[(1, 256, 0), (0, 128, 40)]),
        dict(n_heads=3, k_bits=8, v_bits=2, slices=[(1, 128, 0), (0, 128, 128)], outliers=True),
        dict(n_heads=1, k_bits=4, v_bits=16, slices=[(1, 37, 0), (0, 16, 5)]),
        dict(n_heads=2, k_bits=16, v_bits=8, slices=[(1, 64, 128), (0, 300, 17)]),
    ], 0.3),
    # one engine holds nothing: it must sit the launch out and write nothing
    "empty_engine": ([
        dict(n_heads=1, k_bits=16, v_bits=16, slices=[(1, 0, 1), (0, 0, 0)]),
        dict(n_heads=2, k_bits=4, v_bits=16, slices=[(0, 0, 0), (0, 37, 0)]),
        dict(n_heads=3, k_bits=2, v_bits=2, slices=[(0, 0, 0), (1, 200, 3)]),
    ], 0.2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_attention(name, tmp_path):
    """Several launches back to back, random stalls on every AXI channel of both ports."""
    cases, stalls = CASES[name]
    bdir = build_kernel(**BUILD)
    runner.run(bdir, "tb_kernel", tmp_path, {**BUILD, "cases": cases, "stalls": stalls},
               toplevel="pmkvq_attn", testcase="run_attention")


def test_kernel_bad_arguments_end_with_a_status(tmp_path):
    bdir = build_kernel(**BUILD)
    runner.run(bdir, "tb_kernel", tmp_path, BUILD, toplevel="pmkvq_attn",
               testcase="run_bad_arguments")


def test_kernel_shrink_copy_then_attention(tmp_path):
    """SHRINK on both slices in one launch, a window flush on the engine that holds the window only."""
    bdir = build_kernel(**BUILD)
    runner.run(bdir, "tb_kernel", tmp_path,
               {**BUILD, "stalls": 0.2, "slices": [(1, 64, 0), (0, 64, 32)]}, toplevel="pmkvq_attn",
               testcase="run_shrink_copy_attention")
