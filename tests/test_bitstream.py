"""`make bitstream` (hw/bitstream.py, hw/vitis.py) without Vitis: the generated kernel.xml, package_xo.tcl and
link.cfg agree with the exported Verilog and the host's register map; the exit status tells "no Vitis" from
"xclbin built" and never claims an xclbin that does not exist. No synthesis here (it takes minutes).
The real Vitis build is behind the `vitis` marker."""
import re
import shutil
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pmkvq_accel.hw import bitstream as B
from pmkvq_accel.hw import card as C
from pmkvq_accel.hw import regmap as R
from pmkvq_accel.hw import vitis as V
from pmkvq_accel.hw.kernel import KernelConfig

SMALL = dict(engines=1, head_dim=64, groups=1, max_tokens=256)
SMALL_ARGS = ["--engines", "1", "--pcs-per-engine", "1", "--head-dim", "64", "--groups", "1", "--max-tokens", "256"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small kernel's Verilog and generated files (the Verilog export takes ~30-60 s)."""
    out = tmp_path_factory.mktemp("bitstream")
    cfg = KernelConfig(**SMALL)
    vfile, _ = B.generate_verilog(cfg, out)
    B.write_files(out, cfg, C.plan(engines=1, pcs_per_engine=cfg.pcs_per_engine), V.PLATFORM, V.KERNEL_CLOCK_HZ)
    return out, vfile.read_text()


def _xml(text):
    root = ET.fromstring(text.encode())
    k = root.find("kernel")
    ports = {p.get("name"): p.attrib for p in k.find("ports")}
    args = [a.attrib for a in k.find("args")]
    return k, ports, args


def _int(s):
    return int(s, 0)


# ---------------------------------------------------------------------------------------------------------
def test_kernel_xml_matches_regmap(built):
    out, _ = built
    k, ports, args = _xml((out / "kernel.xml").read_text())
    assert k.get("name") == R.KERNEL_NAME
    assert k.get("hwControlProtocol") == "ap_ctrl_hs" and k.get("interrupt") == "true"
    want = R.all_args(1)
    assert [a["name"] for a in args] == list(want)
    assert [_int(a["id"]) for a in args] == list(range(len(want)))
    spans = []
    for a in args:
        off, bits = want[a["name"]]
        assert _int(a["offset"]) == off and _int(a["size"]) == bits // 8 == _int(a["hostSize"])
        if a["name"] in ("e0_base", "e0_records"):   # the engine's buffers: global pointers on its master
            assert a["addressQualifier"] == "1" and a["type"].endswith("*") and a["port"] == "m_axi_gmem0"
        else:
            assert a["addressQualifier"] == "0" and a["port"] == "s_axi_control"
        spans.append((off, off + bits // 8))
    # no argument overlaps another, the ap_ctrl_hs block (0x00-0x0F) or the status register
    spans.sort()
    assert spans[0][0] >= 0x10
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(not (lo <= R.STATUS < hi) for lo, hi in spans)
    assert ports["s_axi_control"]["mode"] == "slave" and _int(ports["s_axi_control"]["dataWidth"]) == 32
    assert max(hi for _, hi in spans) <= _int(ports["s_axi_control"]["range"])


def test_kernel_xml_ports_exist_in_verilog(built):
    out, verilog = built
    vp = V.verilog_ports(verilog)
    _, ports, args = _xml((out / "kernel.xml").read_text())
    assert vp["ap_clk"] == ("input", 1) and vp["ap_rst_n"] == ("input", 1) and vp["interrupt"] == ("output", 1)
    for name, p in ports.items():
        width = _int(p["dataWidth"])
        if p["mode"] == "slave":
            assert vp[f"{name}_wdata"] == ("input", width) and vp[f"{name}_rdata"] == ("output", width)
            # every argument register is reachable with the slave's address bits
            top = max(_int(a["offset"]) + _int(a["size"]) for a in args)
            assert top <= 1 << vp[f"{name}_araddr"][1] and R.STATUS < 1 << vp[f"{name}_araddr"][1]
            assert _int(p["range"]) == 1 << vp[f"{name}_araddr"][1] == 1 << R.CONTROL_ADDR_BITS
        else:
            assert vp[f"{name}_wdata"] == ("output", width) and vp[f"{name}_rdata"] == ("input", width)
            assert vp[f"{name}_araddr"] == ("output", 64) and vp[f"{name}_awaddr"] == ("output", 64)
    for a in args:
        assert a["port"] in ports
    # the masters in kernel.xml are exactly the Verilog's m_axi_* prefixes
    prefixes = {re.match(r"(m_axi_gmem\d+)_", n).group(1) for n in vp if n.startswith("m_axi_")}
    assert prefixes == {n for n, p in ports.items() if p["mode"] == "master"}


def test_verilog_ports_are_the_axi_interface(built):
    """Every port with the name, direction and width Vivado's interface inference and kernel.xml need."""
    _, verilog = built
    assert B.check_ports(verilog, SMALL["engines"]) == []


def test_link_cfg_names_existing_ports(built):
    out, verilog = built
    vp = V.verilog_ports(verilog)
    cfg = V.parse_link_cfg((out / "link.cfg").read_text())
    _, ports, _ = _xml((out / "kernel.xml").read_text())
    masters = [n for n, p in ports.items() if p["mode"] == "master"]
    assert cfg["nk"] == [f"{R.KERNEL_NAME}:1:{V.INSTANCE}"]
    assert sorted(p for _, p, _ in cfg["sp"]) == sorted(masters)
    kcfg = KernelConfig(**SMALL)
    for inst, port, mem in cfg["sp"]:
        assert inst == V.INSTANCE and f"{port}_araddr" in vp
        e = int(port.removeprefix("m_axi_gmem"))
        assert _pcs(mem) == kcfg.engine_pcs(e)        # exactly the engine's own pseudo-channels
    assert cfg["freqHz"] == [f"{V.KERNEL_CLOCK_HZ}:{V.INSTANCE}.ap_clk"] and "ap_clk" in vp
    (prop,) = cfg["prop"]
    hook = Path(prop.split("=", 1)[1])
    assert prop.startswith("run.impl_1.STEPS.OPT_DESIGN.TCL.PRE=") and hook == (out / "floorplan.tcl").resolve()
    assert hook.is_file()


def _pcs(mem):
    m = re.fullmatch(r"HBM\[(\d+)(?::(\d+))?\]", mem)
    assert m, mem
    lo, hi = int(m[1]), int(m[2] or m[1])
    return tuple(range(lo, hi + 1))


@pytest.mark.parametrize("engines", [1, 2, 3, 4, 16])
def test_generated_files_for_n_engines(engines):
    """kernel.xml / link.cfg / floorplan / package_xo.tcl agree with the port list hw/kernel.py builds for N
    engines: two pointers per master (cache and records), each master on its own pseudo-channels, no two masters sharing one."""
    want = V.expected_ports(engines)
    _, ports, args = _xml(V.kernel_xml(engines))
    masters = [n for n, p in ports.items() if p["mode"] == "master"]
    assert masters == [f"m_axi_gmem{e}" for e in range(engines)]
    for m in masters:
        assert want[f"{m}_rdata"] == ("input", _int(ports[m]["dataWidth"]))
    pointers = {a["name"]: a["port"] for a in args if a["addressQualifier"] == "1"}
    assert pointers == {f"e{e}_{p}": f"m_axi_gmem{e}" for e in range(engines) for p in ("base", "records")}
    assert [a["name"] for a in args] == list(R.all_args(engines))
    k = C.HBM_PCS // engines
    cfg = V.parse_link_cfg(V.link_cfg(engines, k))
    assert [p for _, p, _ in cfg["sp"]] == masters and cfg["prop"] == []
    seen = set()
    for e, (_, _, mem) in enumerate(cfg["sp"]):
        pcs = _pcs(mem)
        assert pcs == KernelConfig(engines=engines, pcs_per_engine=k).engine_pcs(e) and not seen & set(pcs)
        seen |= set(pcs)
    tcl = V.package_xo_tcl(engines)
    assert re.search(r"foreach busif \{s_axi_control " + " ".join(masters) + r"\}", tcl)
    assert "-kernel_xml" in tcl and "-kernel_name $kernel" in tcl and "-clock ap_clk -reset ap_rst_n" in tcl
    plan = C.plan(engines=engines)
    fp = V.floorplan_tcl([plan.engine_slr(e) for e in range(engines)])
    calls = re.findall(r"^pmkvq_engine_pblock (\d+) (SLR\d)$", fp, re.M)
    assert calls == [(str(e), plan.engine_slr(e)) for e in range(engines)]


def test_floorplan_names_the_engine_instances(built):
    """The pblock patterns match the engine instances of the exported Verilog (engine<e> inside the kernel)."""
    _, verilog = built
    assert re.search(r"^\s*\\?\S+\s+\\?engine0\s*\(", verilog, re.M), "no instance named engine0 in the Verilog"
    fp = V.floorplan_tcl(["SLR0"])
    assert f"*{V.INSTANCE}/*engine$engine" in fp and "pblock_dynamic_$slr" in fp


def test_hbm_range_rejects_non_contiguous():
    assert V.hbm_range((4,)) == "HBM[4]" and V.hbm_range((2, 3)) == "HBM[2:3]"
    for bad in ((), (1, 3), (31, 32)):
        with pytest.raises(ValueError):
            V.hbm_range(bad)


def test_package_xo_tcl_refers_to_generated_files(built):
    out, _ = built
    tcl = (out / "package_xo.tcl").read_text()
    for f in re.findall(r"\[file join \$here ([\w.]+)\]", tcl):
        if f not in ("ip", "pack_project", "component.xml"):
            assert (out / f).is_file(), f
    assert f"set kernel   {R.KERNEL_NAME}" in tcl and V.PART in tcl


def test_estimate_uses_the_shared_parser(tmp_path, monkeypatch):
    """`--synth`'s estimate: the yosys that hw/synth_report.py locates, its script's mapping step, its `stat`
    parser and its count (LUT = LUT1-6 + INV + LUT-RAM LUTs, synth_report.device_usage), in resources.json as
    hw/card.py reads it back. A fake yosys writes the stat.txt."""
    from pmkvq_accel.hw import synth_report as S
    from test_synth_report import FLAT
    assert not hasattr(V, "parse_stat") and not hasattr(B, "yosys_command")   # no second parser or locator
    script = V.yosys_script(B.VERILOG, depth=True)
    assert S.synth_commands(V.KERNEL) in script and "-uram" in script and S.LTP_COMMAND in script
    (tmp_path / B.VERILOG).write_text("module pmkvq_attn(); endmodule\n")
    (tmp_path / "fake_stat.txt").write_text(FLAT)
    monkeypatch.setattr(S, "yosys_argv", lambda name: ["cp", str(tmp_path / "fake_stat.txt"), "stat.txt"])
    report = B.synthesize(tmp_path, depth=False, info={"kernel": V.KERNEL})
    res = report["resources"]
    want = S.device_usage(S.parse_stat(FLAT))
    assert {k: res[k] for k in want} == want and res["LUT"] == 30
    assert (res["LUT_logic"], res["INV"], res["LUT_memory"]) == (10, 2, 18)   # its parts, listed apart
    assert res["RAMB36"] == 1 and res["RAMB18"] == 3 and res["CARRY"] == 10 and res["MUXF"] == 1
    assert report["cells"]["RAM64M"] == 4 and report["longest_path_cells"] is None
    table = V.resource_table(res)
    assert "DSP48E2" in table and "LUT1-6 10, INV 2, LUT-RAM/SRL 18" in table
    eng = C.EngineResources.from_report(tmp_path / "resources.json")
    assert (eng.lut, eng.ff, eng.dsp, eng.bram36, eng.uram) == (30, 25, 2, 2.5, 0)


def test_estimate_without_yosys_fails(tmp_path, monkeypatch):
    from pmkvq_accel.hw import synth_report as S
    (tmp_path / B.VERILOG).write_text("module pmkvq_attn(); endmodule\n")
    monkeypatch.setattr(S, "yosys_path", lambda: None)
    assert B.synthesize(tmp_path, depth=False, info={}) is None
    assert not (tmp_path / "resources.json").exists()


# ---------------------------------------------------------------------------------------------------------
def _fake_tools(d: Path, vivado_makes_xo: bool):
    d.mkdir(parents=True, exist_ok=True)
    calls = d / "calls.txt"
    scripts = {"v++": f'echo "v++ $*" >> {calls}\nexit 0\n',   # "succeeds" but writes no xclbin
               "vivado": f'echo "vivado $*" >> {calls}\n' + (f'touch {R.KERNEL_NAME}.xo\n' if vivado_makes_xo else "")
               + "exit 0\n"}
    for name, body in scripts.items():
        f = d / name
        f.write_text("#!/bin/sh\n" + body)
        f.chmod(f.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return calls


def test_exit_status_decision(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert V.find_vitis(str(empty)) is None
    assert V.exit_status(None, None) == V.EXIT_NO_VITIS == 3
    assert V.exit_status(None, None, ok=False) == V.EXIT_FAILED
    _fake_tools(tmp_path / "bin", vivado_makes_xo=False)
    tools = V.find_vitis(str(tmp_path / "bin"))
    assert tools is not None and tools.vpp.endswith("v++") and tools.vivado.endswith("vivado")
    assert V.exit_status(tools, None) == V.EXIT_FAILED
    assert V.exit_status(tools, tmp_path / "missing.xclbin") == V.EXIT_FAILED   # never claim a missing file
    real = tmp_path / "k.xclbin"
    real.write_bytes(b"x")
    assert V.exit_status(tools, real) == V.EXIT_XCLBIN == 0
    assert V.exit_status(tools, real, ok=False) == V.EXIT_FAILED
    assert len({V.EXIT_XCLBIN, V.EXIT_FAILED, V.EXIT_USAGE, V.EXIT_NO_VITIS}) == 4


def test_cli_without_vitis(built, tmp_path, capsys):
    out, verilog = built
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = B.main(SMALL_ARGS + ["--out", str(out), "--no-synth", "--install", ""], path=str(empty))
    text = capsys.readouterr().out
    assert rc == (V.EXIT_NO_VITIS if not B.check_ports(verilog, 1) else V.EXIT_FAILED)
    assert rc != 0
    assert "reused" in text                      # the module fixture's Verilog was reused
    assert "xclbin NOT built: AMD Vitis (v++) is not installed" in text
    assert not list(out.glob("*.xclbin"))
    for f in ("pmkvq_attn.v", "kernel.xml", "package_xo.tcl", "link.cfg", "floorplan.tcl", "card.json",
              "summary.txt"):
        assert (out / f).is_file()
    assert "Composed resource estimate per SLR" in text


@pytest.mark.parametrize("vivado_makes_xo", [False, True])
def test_cli_with_failing_fake_vitis(built, tmp_path, capsys, vivado_makes_xo):
    """A v++ that 'succeeds' without writing the .xclbin must still give a failure, never a claimed build."""
    src, verilog = built
    out = tmp_path / "out"
    out.mkdir()
    for f in ("pmkvq_attn.v", "pmkvq_attn.v.key"):
        shutil.copy(src / f, out / f)
    calls = _fake_tools(tmp_path / "bin", vivado_makes_xo)
    install = tmp_path / "installed.xclbin"
    rc = B.main(SMALL_ARGS + ["--out", str(out), "--install", str(install)], path=str(tmp_path / "bin"))
    text = capsys.readouterr().out
    assert rc == V.EXIT_FAILED
    assert "xclbin NOT built" in text and "xclbin BUILT" not in text
    assert not install.exists() and not (out / "pmkvq_attn.xclbin").exists()
    assert not (out / "resources.json").exists()          # no open-source synthesis when Vitis is present
    ran = calls.read_text().splitlines() if calls.exists() else []
    if B.check_ports(verilog, 1):
        assert ran == []                                   # a broken interface is never sent to Vitis
    else:
        assert ran[0].startswith("vivado -mode batch") and "package_xo.tcl" in ran[0]
        assert (len(ran) == 2 and ran[1].startswith("v++ -l -t hw --platform " + V.PLATFORM)) == vivado_makes_xo


def test_cli_bad_engines(tmp_path):
    assert B.main(["--engines", "0", "--out", str(tmp_path)], path="") == V.EXIT_USAGE


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.vitis
@pytest.mark.skipif(shutil.which("v++") is None, reason="needs AMD Vitis (v++) on PATH")
def test_vitis_builds_xclbin(tmp_path):
    """The real flow: Vivado packaging and v++ link of the default kernel (hours)."""
    out = tmp_path / "bitstream"
    install = tmp_path / "pmkvq_attn.xclbin"
    rc = B.main(["--out", str(out), "--install", str(install)])
    assert rc == V.EXIT_XCLBIN
    xclbin = out / "pmkvq_attn.xclbin"
    assert xclbin.is_file() and xclbin.stat().st_size > 1_000_000 and install.is_file()
    assert xclbin.read_bytes()[:7] == b"xclbin2"
    if shutil.which("xclbinutil"):
        import subprocess
        info = subprocess.run(["xclbinutil", "--info", "--input", str(xclbin)], capture_output=True, text=True)
        assert info.returncode == 0 and R.KERNEL_NAME in info.stdout
