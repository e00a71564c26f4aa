"""Shared testbench pieces: Amaranth stream ports as cocotbext-axi buses, clock/reset, stall patterns."""
from __future__ import annotations

import itertools
import logging
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge, SimTimeoutError, with_timeout
from cocotbext.axi import AxiStreamBus, AxiStreamFrame, AxiStreamSink, AxiStreamSource


class StreamBus(AxiStreamBus):
    """An Amaranth lib.stream port (`<name>__valid/__ready/__payload`) seen as an AXI stream."""
    _signals = {"tdata": "payload"}
    _optional_signals = {"tvalid": "valid", "tready": "ready"}

    def __init__(self, entity, prefix):
        super().__init__(entity, prefix, bus_separator="__")


def pause_gen(rng: random.Random, prob: float):
    """True = pause this cycle (random valid gaps / backpressure with probability `prob`)."""
    if prob <= 0:
        return itertools.repeat(False)
    return (rng.random() < prob for _ in itertools.count())


CLOCK_NS = 4


class TB:
    """Owns the clock, the reset and one source/sink per stream port."""

    def __init__(self, dut, sources=(), sinks=(), seed=0):
        self.dut = dut
        self.clock_ns = CLOCK_NS
        self.rng = random.Random(seed)
        for name in ("cocotb.top", "cocotb"):
            logging.getLogger(name).setLevel(logging.WARNING)
        cocotb.start_soon(Clock(dut.clk, self.clock_ns, unit="ns").start())
        self.src = {n: AxiStreamSource(StreamBus(dut, n), dut.clk, dut.rst, byte_lanes=1) for n in sources}
        self.snk = {n: AxiStreamSink(StreamBus(dut, n), dut.clk, dut.rst, byte_lanes=1) for n in sinks}
        for x in list(self.src.values()) + list(self.snk.values()):
            x.log.setLevel(logging.WARNING)

    def set_stalls(self, src_prob: float, snk_prob: float):
        for s in self.src.values():
            s.set_pause_generator(pause_gen(self.rng, src_prob))
        for s in self.snk.values():
            s.set_pause_generator(pause_gen(self.rng, snk_prob))

    async def reset(self, cycles=3):
        self.dut.rst.value = 1
        for _ in range(cycles):
            await RisingEdge(self.dut.clk)
        self.dut.rst.value = 0
        await RisingEdge(self.dut.clk)

    async def send(self, name, items):
        await self.src[name].send(AxiStreamFrame(tdata=[int(x) for x in items]))

    async def recv(self, name, n, timeout_cycles=1_000_000):
        """The next `n` frames of sink `name`, their data concatenated. Fails (AssertionError) when they
        have not all arrived within `timeout_cycles` clock cycles (None: wait for ever)."""
        out = []
        sink = self.snk[name]

        async def collect():
            for _ in range(n):
                frame = await sink.recv()
                out.extend(frame.tdata)
            return out
        if timeout_cycles is None:
            return await collect()
        try:
            return await with_timeout(collect(), timeout_cycles * self.clock_ns, "ns")
        except SimTimeoutError:
            raise AssertionError(f"stream {name!r}: {len(out)} items after {timeout_cycles} cycles, "
                                 f"waiting for {n} frames") from None


STALL_PATTERNS = [(0.0, 0.0), (0.3, 0.0), (0.0, 0.5), (0.25, 0.4)]
