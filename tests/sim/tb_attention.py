"""Whole-datapath testbench: jobs in, (M, L, E, acc) per head out, bit for bit against
`model.attention.attention_partial`, under random valid gaps and backpressure, with a reset mid-stream."""
from __future__ import annotations

import cocotb
import numpy as np
from cocotb.triggers import RisingEdge, with_timeout

from pmkvq_accel.hw.config import DatapathConfig
from pmkvq_accel.hw.jobs import decode_result, expected_beats, job_descriptor, job_words
from pmkvq_accel.model.attention import attention_partial

from pmkvq_accel.sim.jobgen import random_job
from pmkvq_accel.sim.runner import tb_config
from pmkvq_accel.sim.tb_common import TB


def _cfg():
    c = tb_config()
    return c, DatapathConfig(**c["dp"])


def make_job(cfg: DatapathConfig, spec: dict, seed: int):
    rng = np.random.default_rng(seed)
    query, keys, values = random_job(rng, cfg.groups, cfg.head_dim, spec["tokens"], spec["kbits"],
                                     spec["vbits"], spec.get("kind", "normal"), spec.get("sink", 16),
                                     spec.get("window", 16), spec.get("edge", 16), spec.get("split"))
    part = attention_partial(query, keys, values)
    return job_descriptor(cfg, query, keys, values), job_words(cfg, keys, values), expected_beats(part)


async def run_job(tb: TB, cfg, desc, words, expect, label):
    await tb.send("job", [desc])
    await tb.send("data", words)
    got = await with_timeout(tb.recv("result", cfg.groups), 200 * len(words) + 20000, "ns")
    for g, (raw, exp) in enumerate(zip(got, expect)):
        res = decode_result(cfg, raw)
        for key in ("head", "m", "l", "e"):
            assert res[key] == exp[key], f"{label}: head {g} {key}: got {res[key]}, want {exp[key]}"
        if res["acc"] != exp["acc"]:
            bad = [d for d in range(cfg.head_dim) if res["acc"][d] != exp["acc"][d]]
            d = bad[0]
            raise AssertionError(f"{label}: head {g} acc differs in {len(bad)} dims, first d={d}: "
                                 f"got {res['acc'][d]}, want {exp['acc'][d]}")


@cocotb.test()
async def test_jobs(dut):
    c, cfg = _cfg()
    tb = TB(dut, sources=("job", "data"), sinks=("result",), seed=c.get("seed", 1))
    await tb.reset()
    for i, spec in enumerate(c["jobs"]):
        tb.set_stalls(*spec.get("stalls", (0.0, 0.0)))
        desc, words, expect = make_job(cfg, spec, c.get("seed", 1) * 1000 + i)
        await run_job(tb, cfg, desc, words, expect, f"job {i} {spec}")


@cocotb.test()
async def test_reset_mid_stream(dut):
    c, cfg = _cfg()
    if not c.get("reset_test", True):
        return
    tb = TB(dut, sources=("job", "data"), sinks=("result",), seed=7)
    await tb.reset()
    tb.set_stalls(0.2, 0.2)
    spec = {"tokens": 100, "kbits": 4, "vbits": 2}
    desc, words, expect = make_job(cfg, spec, 99)
    await tb.send("job", [desc])
    await tb.send("data", words[: len(words) // 2])
    for _ in range(len(words) // 3):
        await RisingEdge(dut.clk)
    await tb.reset()           # sources and sinks drop what they hold on reset
    for _ in range(5):
        await RisingEdge(dut.clk)
    spec = {"tokens": 40, "kbits": 2, "vbits": 8}
    desc, words, expect = make_job(cfg, spec, 98)
    await run_job(tb, cfg, desc, words, expect, "after reset")
