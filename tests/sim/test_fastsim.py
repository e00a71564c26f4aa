"""The C++ harness (no Python per cycle): long streams bit-exact under gaps/backpressure, and the
throughput goal (>= 0.98 of one word per cycle for T >= 1024, fill and drain included)."""
import numpy as np
import pytest

from pmkvq_accel.hw.config import DatapathConfig
from pmkvq_accel.hw.jobs import decode_result, expected_beats, job_beats, job_descriptor, job_words
from pmkvq_accel.model.attention import attention_partial
from pmkvq_accel.sim.fastsim import FastSim
from pmkvq_accel.sim.jobgen import random_job

PARAMS = dict(word_bits=128, head_dim=64, groups=2, max_tokens=2048)   # shares test_datapath's build


@pytest.fixture(scope="module")
def sim():
    return FastSim(DatapathConfig(**PARAMS))


def _jobs(cfg, specs, seed):
    rng = np.random.default_rng(seed)
    jobs, exps = [], []
    for T, kb, vb, kind in specs:
        q, k, v = random_job(rng, cfg.groups, cfg.head_dim, T, kb, vb, kind, split_body=T // 3 or None)
        jobs.append((job_descriptor(cfg, q, k, v), job_words(cfg, k, v)))
        exps.append(expected_beats(attention_partial(q, k, v)))
    return jobs, exps


@pytest.mark.parametrize("gap,bp", [(0.0, 0.0), (0.3, 0.5)])
def test_long_streams_bit_exact(sim, gap, bp):
    cfg = sim.cfg
    specs = [(2048, 2, 2, "outlier"), (1500, 4, 8, "extreme"), (129, 16, 2, "dominant"), (1, 8, 8, "normal"),
             (1000, 8, 4, "equal")]
    jobs, exps = _jobs(cfg, specs, 11)
    for n, (res, exp) in enumerate(zip(sim.run(jobs, gap, bp), exps)):
        got = [decode_result(cfg, b) for b in res["beats"]]
        assert got == exp, f"job {n} {specs[n]} differs"


def test_throughput_goal(sim):
    cfg = sim.cfg
    rng = np.random.default_rng(5)
    for bits in (16, 8, 4, 2):       # every token at the same width: the fewest words, the hardest case
        q, k, v = random_job(rng, cfg.groups, cfg.head_dim, 1024, bits, bits, edge_bits=bits)
        words = job_words(cfg, k, v)
        res = sim.run([(job_descriptor(cfg, q, k, v), words)])[0]
        assert [decode_result(cfg, b) for b in res["beats"]] == expected_beats(attention_partial(q, k, v))
        beats = job_beats(cfg, k, v)
        ratio = beats / res["cycles"]
        assert ratio >= 0.98, f"{bits}-bit: {res['cycles']} cycles for {beats} beats ({ratio:.4f})"
