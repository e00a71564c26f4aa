"""Whole decode-attention datapath on Verilator, bit-exact against the golden model."""
import pytest

from pmkvq_accel.hw.attention import DecodeAttention
from pmkvq_accel.hw.config import DatapathConfig
from pmkvq_accel.sim import runner

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
    "w64_hd128_g1": (dict(word_bits=64, head_dim=128, groups=1, max_tokens=1024), [   # tokens span words
        dict(tokens=1, kbits=16, vbits=2),
        dict(tokens=129, kbits=2, vbits=4, kind="outlier", stalls=(0.3, 0.5)),
        dict(tokens=40, kbits=8, vbits=16, kind="extreme", sink=3, window=7, split=10),
    ]),
    "w256_hd64_g1": (dict(word_bits=256, head_dim=64, groups=1, max_tokens=1024), [   # 1 value slot:
        dict(tokens=131, kbits=4, vbits=2, stalls=(0.3, 0.5)),                        # 2-bit words in 2 beats
        dict(tokens=37, kbits=2, vbits=2, kind="outlier", sink=3, window=5, split=11),
    ]),
    "w512_hd64_g3": (dict(word_bits=512, head_dim=64, groups=3, max_tokens=4096), [
        dict(tokens=1030, kbits=2, vbits=2, stalls=(0.2, 0.3)),
        dict(tokens=129, kbits=4, vbits=8, kind="outlier", split=50),
        dict(tokens=127, kbits=16, vbits=2, kind="extreme", stalls=(0.3, 0.5)),
        dict(tokens=2, kbits=8, vbits=8, kind="zeroq"),
        dict(tokens=300, kbits=8, vbits=4, kind="dominant", sink=4, window=5, stalls=(0.1, 0.0)),
    ]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention(name, tmp_path):
    params, jobs = CONFIGS[name]
    cfg = DatapathConfig(**params)
    bdir = runner.build("attention", lambda: DecodeAttention(cfg), params)
    runner.run(bdir, "tb_attention", tmp_path, {"dp": params, "jobs": jobs, "seed": 3})
