"""Whole decode-attention datapath on Verilator, bit-exact against the golden model."""
import pytest

from pmkvq_accel.hw.attention import DecodeAttention
from pmkvq_accel.hw.config import DatapathConfig
from pmkvq_accel.sim import runner

STALLS = [(0.0, 0.0), (0.3, 0.5)]

CONFIGS = {
    # name: (datapath params, jobs)
    "w128_hd64_g2": (dict(word_bits=128, head_dim=64, groups=2, max_tokens=2048), [
        dict(tokens=1, kbits=2, vbits=2),
        dict(tokens=2, kbits=16, vbits=16, stalls=(0.3, 0.5)),
        dict(tokens=127, kbits=4, vbits=2, kind="outlier", stalls=(0.3, 0.0)),
        dict(tokens=129, kbits=8, vbits=4, kind="extreme", split=40),
        dict(tokens=128, kbits=2, vbits=8, kind="equal", stalls=(0.0, 0.5)),
        dict(tokens=50, kbits=4, vbits=4, kind="saturate"),
    ]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention(name, tmp_path):
    params, jobs = CONFIGS[name]
    cfg = DatapathConfig(**params)
    bdir = runner.build("attention", lambda: DecodeAttention(cfg), params)
    runner.run(bdir, "pmkvq_accel.sim.tb_attention", tmp_path, {"dp": params, "jobs": jobs, "seed": 3})
