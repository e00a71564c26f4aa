"""Build the whole kernel (hw/kernel.py) for Verilator, sharing sim/runner.py's build directories and locks.

The kernel's top level has named ports (Vitis names), so it is exported with kernel_verilog() rather than
the runner's Component conversion."""
from __future__ import annotations

from pathlib import Path

from . import runner


def shared_test_config():
    """The one small kernel build the test suite shares (tests/kernel, tests/test_host_sim.py,
    tests/test_hbm_model.py, the README example on sim): 128-bit words, two engines, engine 0 in SLR0 and
    engine 1 in SLR1 (so its master crosses an SLR boundary through the register stages the card plan gives
    such an engine), 16 pseudo-channels per engine as
    the card plan gives two engines (SimDevice builds the same; the records sit in a PC of their own), the SmolLM2 shape. The memory layout depends on neither the word width nor the engine
    count."""
    from pmkvq_accel.hw.card import HBM_PCS, TODAY_ENGINE, CardPlan
    from pmkvq_accel.hw.kernel import KernelConfig
    stages = CardPlan(TODAY_ENGINE, {"SLR0": 1, "SLR1": 1, "SLR2": 0}, 1).slr_stages()
    return KernelConfig(engines=2, pcs_per_engine=HBM_PCS // 2, word_bits=128, head_dim=64, groups=3,
                        max_tokens=2048, slr_stages=stages)


def build_kernel(engines: int = 1, word_bits: int = 128, head_dim: int = 64, groups: int = 3,
                 max_tokens: int = 2048, pcs_per_engine: int = 1, slr_stages: tuple = ()) -> Path:
    from pmkvq_accel.hw.kernel import KernelConfig, kernel_verilog
    cfg = KernelConfig(engines=engines, word_bits=word_bits, head_dim=head_dim, groups=groups,
                       max_tokens=max_tokens, pcs_per_engine=pcs_per_engine, slr_stages=tuple(slr_stages))
    params = dict(e=engines, w=word_bits, hd=head_dim, g=groups, t=max_tokens)
    if pcs_per_engine != 1:   # (keeps the directory names of the one-PC builds)
        params["k"] = pcs_per_engine
    if any(slr_stages):
        params["s"] = "".join(map(str, slr_stages))
    runner._env_setup()
    key = runner.design_key("kernel", params)
    bdir = runner.BUILD_ROOT / key
    stamp = bdir / "stamp"
    want = runner.rtl_source_key(dict(params, top="kernel"))   # every source the RTL reads, and the parameters
    with runner._locked(runner.BUILD_ROOT / f".{key}.lock"):
        if stamp.exists() and stamp.read_text() == want and (bdir / "pmkvq_attn").exists():
            return bdir
        bdir.mkdir(parents=True, exist_ok=True)
        vfile = bdir / "kernel.v"
        text = kernel_verilog(cfg)
        vfile.write_text(text)
        vlt = bdir / "ports.vlt"
        vlt.write_text(runner._ports_vlt(text, "pmkvq_attn"))
        runner._runner().build(sources=[vlt, vfile], hdl_toplevel="pmkvq_attn", build_dir=bdir,
                               build_args=runner.BUILD_ARGS, always=True, timescale=("1ns", "1ps"),
                               log_file=bdir / "build.log")
        stamp.write_text(want)
    return bdir
