"""The U280's HBM as the simulations see it: per pseudo-channel (PC) bandwidth, read latency, and the penalty
for a master reading a PC that is not one of its own. One model (`HbmModel`) for both memories of the project:
the C++ kernel harness (sim/kernel_harness.cpp via sim/kernel_sim.py) and the cocotb bench (`HbmRam`).

Figures and sources (docs/card.md):
- PC peak 14.375 GB/s (256-bit AXI3 at 450 MHz; 32 PCs, 460 GB/s; /work/shared/docs/alveo.md).
- efficiency 0.92: the measured whole-card 425 GB/s (Shuhai, FCCM 2020; Vitis hbm_bandwidth: 421 GB/s) over
  460 GB/s is 0.924, for long sequential bursts like the kernel's (64-beat, 4 KiB-aligned reads).
- cross efficiency 0.46: FlightLLM's model (U280) gives a master 0.7 of peak on its local channels and 0.35 across
  the switch: half, so 0.92 / 2.
- read latency 300 ns (68 cycles at 225 MHz): Shuhai measures ~107-138 ns (page hit to page miss) at the HBM
  AXI port; the kernel side adds the clock converter (kernel clock -> 450 MHz), the platform's interconnect and
  the SLR-crossing register slices; 300 ns is a conservative sum (assumed). Cross-PC reads add 100 ns (a lateral
  hop of the switch; assumed).
- the kernel's port: 512 bits, one beat per cycle at the kernel clock (`clock_mhz`, default the card's 225 MHz).

Bandwidth is a token bucket per PC, shared by every master that reads or writes that PC: it earns
`pc_bytes_per_cycle` bytes each kernel cycle (capped, so an idle PC banks no more than one beat), a local beat
costs `word_bytes`, a cross-PC beat costs `word_bytes * efficiency / cross_efficiency` (the switch's lost
cycles); the first beat of a burst comes `read_latency` after its address (plus the cross latency).
Not modelled: a master's own HBM AXI port (256 bits at 450 MHz, the PC's rate), which in the card caps a master
at one PC's bandwidth even when it reads two PCs; the kernel reads its cache from one PC and writes only the
partial records (< 0.1 % of the bytes) to its second, so the model's credit for that second PC is negligible.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from pmkvq_accel.hw.card import CARD_CLOCK_MHZ, HBM_PCS, PC_PEAK_GBPS

IDEAL_BYTES_PER_CYCLE = 1e9   # "no bandwidth limit" (the harness's former fixed-latency memory)


@dataclass(frozen=True)
class HbmModel:
    clock_mhz: float = CARD_CLOCK_MHZ   # the kernel clock the cycles are counted in
    pc_peak_gbps: float = PC_PEAK_GBPS
    efficiency: float = 0.92
    cross_efficiency: float = 0.46
    read_latency_ns: float = 300.0
    cross_latency_ns: float = 100.0
    word_bytes: int = 64
    ideal: bool = False                 # True: no bandwidth limit, no cross penalty (fixed latency only)

    def __post_init__(self):
        if not (self.clock_mhz > 0 and self.pc_peak_gbps > 0 and 0 < self.cross_efficiency <= self.efficiency <= 1):
            raise ValueError(f"bad HBM model {self}: need clock, peak > 0 and 0 < cross_efficiency <= "
                             "efficiency <= 1")
        if self.read_latency_ns < 0 or self.cross_latency_ns < 0:
            raise ValueError("latencies must be >= 0")

    @classmethod
    def fixed_latency(cls, cycles: int, clock_mhz: float = CARD_CLOCK_MHZ) -> "HbmModel":
        """The former harness memory: `cycles` of read latency, any bandwidth, every PC alike."""
        return cls(clock_mhz=clock_mhz, read_latency_ns=cycles * 1e3 / clock_mhz, cross_latency_ns=0.0,
                   ideal=True)

    def at_clock(self, clock_mhz: float) -> "HbmModel":
        return replace(self, clock_mhz=clock_mhz)

    # ---- in kernel cycles ----
    def cycles(self, ns: float) -> int:
        return int(math.ceil(ns * self.clock_mhz / 1e3 - 1e-9))

    @property
    def read_latency(self) -> int:
        return self.cycles(self.read_latency_ns)

    @property
    def cross_latency(self) -> int:
        return 0 if self.ideal else self.cycles(self.cross_latency_ns)

    @property
    def pc_gbps(self) -> float:
        """Sustained local bandwidth of one PC."""
        return self.pc_peak_gbps * self.efficiency

    @property
    def pc_bytes_per_cycle(self) -> float:
        return IDEAL_BYTES_PER_CYCLE if self.ideal else self.pc_gbps * 1e3 / self.clock_mhz

    @property
    def cross_beat_cost(self) -> float:
        """Bytes of a PC's budget one cross-PC beat uses."""
        return float(self.word_bytes) if self.ideal else self.word_bytes * self.efficiency / self.cross_efficiency

    def port_words_per_cycle(self) -> float:
        """The most one master streams: one word a cycle at its port, and one PC's rate at the HBM side (a
        master is attached to one 256-bit HBM AXI port at 450 MHz, the PC's own rate, whichever PCs it
        reads through the switch: spreading a buffer over two PCs does not add bandwidth)."""
        return min(1.0, self.pc_bytes_per_cycle / self.word_bytes)

    def harness_args(self) -> list[str]:
        """Command-line arguments of sim/kernel_harness.cpp: latency, cross latency (cycles), PC bytes per
        cycle, cross factor (a cross-PC beat's cost in words; the harness uses its own word width)."""
        return [str(self.read_latency), str(self.cross_latency), repr(self.pc_bytes_per_cycle),
                repr(self.cross_beat_cost / self.word_bytes)]

    def describe(self) -> str:
        if self.ideal:
            return f"fixed read latency {self.read_latency} cycles, no bandwidth limit"
        return (f"HBM model: {self.clock_mhz:g} MHz kernel clock, PC {self.pc_peak_gbps:g} GB/s x {self.efficiency:g}"
                f" = {self.pc_gbps:.2f} GB/s ({self.pc_bytes_per_cycle:.1f} B/cycle), cross-PC x "
                f"{self.cross_efficiency:g}, read latency {self.read_latency_ns:g} ns ({self.read_latency} cycles)"
                f" + {self.cross_latency_ns:g} ns across")


def home_pcs(cfg, e: int) -> tuple[int, ...]:
    """Engine e's own PCs: cfg.engine_pcs(e) (hw/kernel.py KernelConfig); (e,) for a config without it."""
    f = getattr(cfg, "engine_pcs", None)
    pcs = tuple(f(e)) if f is not None else (e,)
    if not pcs or not all(0 <= p < HBM_PCS for p in pcs):
        raise ValueError(f"engine {e}'s PCs {pcs} are not within 0..{HBM_PCS - 1}")
    return pcs


# ---------------------------------------------------------------------------------------------------------
# cocotb: an AXI RAM whose read data channel delivers at the PC rate with the latency
class PcBudget:
    """The per-PC token buckets, shared by every HbmRam of one simulation (pass the same object to each)."""

    def __init__(self, model: HbmModel):
        self.model = model
        self.credit = [0.0] * HBM_PCS
        self.cycle = -1
        self.max_cost = float(model.word_bytes)   # the bucket holds one cycle's bytes plus one beat

    def tick(self, cycle: int) -> None:
        """Earn this cycle's bytes once per cycle (whichever RAM calls first)."""
        if cycle != self.cycle:
            steps = 1 if self.cycle < 0 else cycle - self.cycle
            r = self.model.pc_bytes_per_cycle
            cap = r + self.max_cost
            self.credit = [min(c + r * steps, cap) for c in self.credit]
            self.cycle = cycle

    def take(self, pc: int, cost: float) -> bool:
        if pc < 0 or self.model.ideal:
            return True
        self.max_cost = max(self.max_cost, cost)
        if self.credit[pc] >= cost - 1e-9:
            self.credit[pc] -= cost
            return True
        return False


class HbmRam:
    """AXI4 slave memory for a cocotb bench with the HBM model on reads: a burst's first beat comes
    `read_latency` (+ `cross_latency` for a PC outside `home_pcs`) cycles after its address, each beat takes
    its cost from the PC's bucket (shared through `budget` by all RAMs of a bench), one burst after the other
    (one AXI ID: in order). Writes are accepted at once and acknowledged after `read_latency` (unlimited).
    `pc_of(addr)` names an address's PC (-1: no bandwidth limit); the RAM holds bus addresses
    `base` .. `base + size - 1` (one engine's buffer). Random stalls: `stall_r` (probability a beat
    is held back a cycle) and `stall_ar`; `faults` counts accesses outside `size`, answered with SLVERR.

        ram = HbmRam(dut, "m_axi_gmem0", dut.ap_clk, dut.ap_rst_n, 1 << 22, HbmModel(),
                     pc_of=lambda a: a >> 28, home_pcs=(0,))
        ram.write(addr, data); ram.read(addr, n); ram.r_beats, ram.r_first, ram.r_last
    """

    def __init__(self, dut, prefix, clock, reset, size, model: HbmModel | None = None, pc_of=lambda addr: 0,
                 home_pcs=(0,), budget: PcBudget | None = None, stall_r: float = 0.0, stall_ar: float = 0.0,
                 seed: int = 0, reset_active_level: bool = False, base: int = 0):
        import cocotb
        self.model = model or HbmModel()
        self.budget = budget or PcBudget(self.model)
        if self.budget.model != self.model:
            raise ValueError("the shared PcBudget was made for another HbmModel")
        self.clock, self.reset, self.reset_level = clock, reset, reset_active_level
        self.mem = bytearray(size)
        self.base = base                   # the RAM holds bus addresses base .. base + size - 1
        self.pc_of, self.home = pc_of, frozenset(home_pcs)
        self.rng = random.Random(seed)
        self.stall_r, self.stall_ar = stall_r, stall_ar
        self.s = {n: getattr(dut, f"{prefix}_{n}") for n in (
            "arvalid", "arready", "araddr", "arlen", "arsize", "rvalid", "rready", "rdata", "rlast", "rresp",
            "awvalid", "awready", "awaddr", "awlen", "wvalid", "wready", "wdata", "wstrb", "wlast", "bvalid",
            "bready", "bresp")}
        for opt in ("rid", "bid"):
            if hasattr(dut, f"{prefix}_{opt}"):
                self.s[opt] = getattr(dut, f"{prefix}_{opt}")
        self.wbytes = len(self.s["rdata"]) // 8
        self.r_beats, self.r_first, self.r_last, self.faults = 0, None, None, 0
        self.cycle = 0
        cocotb.start_soon(self._read())
        cocotb.start_soon(self._write())

    # memory access for the bench
    def write(self, addr, data):
        a = addr - self.base
        if a < 0 or a + len(data) > len(self.mem):
            raise ValueError(f"{len(data)} bytes at {addr:#x} are outside the RAM ({self.base:#x} + {len(self.mem):#x})")
        self.mem[a:a + len(data)] = data

    def read(self, addr, n):
        a = addr - self.base
        if a < 0 or a + n > len(self.mem):
            raise ValueError(f"{n} bytes at {addr:#x} are outside the RAM ({self.base:#x} + {len(self.mem):#x})")
        return bytes(self.mem[a:a + n])

    def _cost(self, addr):
        pc = self.pc_of(addr)
        local = pc in self.home or pc < 0
        factor = 1.0 if local else self.model.cross_beat_cost / self.model.word_bytes
        return pc, self.wbytes * factor, local

    def _in_reset(self):
        return self.reset is not None and bool(self.reset.value) == self.reset_level

    async def _read(self):
        from cocotb.triggers import RisingEdge
        s, queue, beat = self.s, [], None
        s["arready"].value = 0
        s["rvalid"].value = 0
        s["rresp"].value = 0
        if "rid" in s:
            s["rid"].value = 0
        while True:
            await RisingEdge(self.clock)
            self.cycle += 1
            self.budget.tick(self.cycle)
            if self._in_reset():
                queue.clear()
                beat = None
                s["rvalid"].value = 0
                s["arready"].value = 0
                continue
            # sample the handshakes of the edge
            if beat is not None and s["rvalid"].value and s["rready"].value:
                self.r_beats += 1
                self.r_first = self.cycle if self.r_first is None else self.r_first
                self.r_last = self.cycle
                beat = None
            if s["arvalid"].value and s["arready"].value:
                addr, n = int(s["araddr"].value), int(s["arlen"].value) + 1
                pc, cost, local = self._cost(addr)
                lat = self.model.read_latency + (0 if local else self.model.cross_latency)
                queue.append([self.cycle + lat, addr, n, pc, cost])
            s["arready"].value = int(len(queue) < 64 and self.rng.random() >= self.stall_ar)
            if beat is None and queue and queue[0][0] <= self.cycle and self.rng.random() >= self.stall_r:
                q = queue[0]
                if self.budget.take(q[3], q[4]):
                    beat, q[1], q[2] = q[1], q[1] + self.wbytes, q[2] - 1
                    last = q[2] == 0
                    if last:
                        queue.pop(0)
                    a = beat - self.base
                    ok = 0 <= a and a + self.wbytes <= len(self.mem)
                    self.faults += not ok
                    s["rdata"].value = int.from_bytes(self.mem[a:a + self.wbytes], "little") if ok else 0
                    s["rresp"].value = 0 if ok else 2
                    s["rlast"].value = int(last)
            s["rvalid"].value = int(beat is not None)

    async def _write(self):
        from cocotb.triggers import RisingEdge
        s = self.s
        s["awready"].value = 0
        s["wready"].value = 0
        s["bvalid"].value = 0
        s["bresp"].value = 0
        if "bid" in s:
            s["bid"].value = 0
        bursts, acks, cycle = [], [], 0
        while True:
            await RisingEdge(self.clock)
            cycle += 1
            if self._in_reset():
                bursts.clear()
                acks.clear()
                s["awready"].value = s["wready"].value = s["bvalid"].value = 0
                continue
            if s["bvalid"].value and s["bready"].value:
                acks.pop(0)
            if s["awvalid"].value and s["awready"].value:
                bursts.append([int(s["awaddr"].value), int(s["awlen"].value) + 1, False])
            if s["wvalid"].value and s["wready"].value and bursts:
                b = bursts[0]
                data = int(s["wdata"].value).to_bytes(self.wbytes, "little")
                strb = int(s["wstrb"].value)
                a = b[0] - self.base
                if 0 <= a and a + self.wbytes <= len(self.mem):
                    for i in range(self.wbytes):
                        if strb >> i & 1:
                            self.mem[a + i] = data[i]
                else:
                    b[2] = True
                    self.faults += 1
                b[0] += self.wbytes
                b[1] -= 1
                if b[1] == 0 or s["wlast"].value:
                    acks.append((cycle + self.model.read_latency, b[2]))
                    bursts.pop(0)
            s["awready"].value = int(len(bursts) < 64)
            s["wready"].value = int(bool(bursts))
            ready = bool(acks) and acks[0][0] <= cycle
            s["bvalid"].value = int(ready)
            s["bresp"].value = 2 if ready and acks[0][1] else 0
