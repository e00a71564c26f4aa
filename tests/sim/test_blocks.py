"""Each datapath block on Verilator against the golden model, under random stalls."""
import os

import pytest

from pmkvq_accel.hw.config import DatapathConfig
from pmkvq_accel.hw.score import ScoreBlock
from pmkvq_accel.hw.softmax import WeightUnit
from pmkvq_accel.hw.unpack import Unpack
from pmkvq_accel.hw.values import MacBlock
from pmkvq_accel.sim import runner

TB = "tb_blocks"   # tests/sim/tb_blocks.py (pytest puts this folder on sys.path, the runner passes it on)
# The 512-bit score/weight/MAC blocks are also exercised inside the 512-bit datapath test; their own
# builds are long, so they run with PMKVQ_SIM_EXTENDED=1 (marked slow).
EXTENDED = pytest.mark.skipif(not os.environ.get("PMKVQ_SIM_EXTENDED"),
                              reason="set PMKVQ_SIM_EXTENDED=1 for the 512-bit block builds")
DP_SMALL = dict(word_bits=128, head_dim=64, groups=2)     # multi-word tokens at 8/16 bits, 1 token slot
DP_WIDE = dict(word_bits=512, head_dim=64, groups=2)      # 4 token slots per word at 2 bits
DP_NARROW = dict(word_bits=64, head_dim=128, groups=1)    # every width spans several words


def _run(block, factory, dp, tmp_path, **cfg):
    bdir = runner.build(block, factory, dp)
    runner.run(bdir, TB, tmp_path, {"dp": dp, "block": block, "seed": 5, **cfg}, testcase=f"test_{block}")


@pytest.mark.parametrize("dp", [DP_SMALL, DP_WIDE, DP_NARROW, dict(word_bits=256, head_dim=128, groups=1)],
                         ids=["w128hd64", "w512hd64", "w64hd128", "w256hd128"])
def test_unpack(dp, tmp_path):
    cfg = DatapathConfig(**dp)
    _run("unpack", lambda: Unpack(cfg, tag_width=8), dp, tmp_path, tag_width=8, beats=400)


JOBS = [dict(tokens=40, kbits=2, vbits=2), dict(tokens=37, kbits=4, vbits=8, kind="outlier"),
        dict(tokens=35, kbits=8, vbits=4, kind="extreme"), dict(tokens=33, kbits=2, vbits=16, kind="saturate")]


WIDE = pytest.param(DP_WIDE, id="w512hd64", marks=[pytest.mark.slow, EXTENDED])


# 2 token slots sharing each DSP (slot 1: 2-bit codes in the upper lane of slot 0's operand)
DP_PACKED = dict(word_bits=256, head_dim=64, groups=1)


@pytest.mark.parametrize("dp", [pytest.param(DP_SMALL, id="w128hd64"), pytest.param(DP_PACKED, id="w256hd64g1"),
                                WIDE])
def test_score(dp, tmp_path):
    cfg = DatapathConfig(**dp)
    _run("score", lambda: ScoreBlock(cfg, tag_width=12), dp, tmp_path, tag_width=12, jobs=JOBS)


@pytest.mark.parametrize("dp", [pytest.param(DP_SMALL, id="w128hd64"), WIDE])
def test_weight(dp, tmp_path):
    cfg = DatapathConfig(**dp)
    _run("weight", lambda: WeightUnit(cfg, tag_width=12), dp, tmp_path, tag_width=12, jobs=JOBS)


@pytest.mark.parametrize("dp", [pytest.param(DP_SMALL, id="w128hd64"), pytest.param(DP_PACKED, id="w256hd64g1"),
                                pytest.param(dict(word_bits=512, head_dim=64, groups=1), id="w512hd64g1"), WIDE])
def test_mac(dp, tmp_path):
    cfg = DatapathConfig(**dp)
    _run("mac", lambda: MacBlock(cfg), dp, tmp_path, runs=[1, 2, 17, 60])


@pytest.mark.parametrize("word_bits,lane_bits", [(512, None), (512, 512), (256, None), (128, None), (64, None)])
def test_shrink(word_bits, lane_bits, tmp_path):
    """The engine's unit (default lanes: 8 beats per word at 512 bits, 4 at 256, 2 at 128; the 64-bit core
    alone) and the full-width core."""
    from pmkvq_accel.hw.shrink import ShrinkUnit
    dp = {"word_bits": word_bits, "lane_bits": lane_bits}
    bdir = runner.build("shrink", lambda: ShrinkUnit(word_bits, lane_bits), dp)
    runner.run(bdir, TB, tmp_path, {"block": "shrink", "word_bits": word_bits, "seed": 9,
                                    "blocks": [(5, 64, 8), (3, 128, 4), (17, 64, 2), (1, 64, 2), (33, 128, 8)]},
               testcase="test_shrink")


# the refused constructions leave half-built components behind, which Amaranth reports as never elaborated
@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_constructors_reject_bad_parameters():
    from pmkvq_accel.hw.shrink import ShrinkUnit
    with pytest.raises(ValueError, match="memory word width"):
        DatapathConfig(word_bits=96)
    with pytest.raises(ValueError, match="head_dim"):
        DatapathConfig(head_dim=96)
    with pytest.raises(ValueError, match=r"G \(query heads per KV head\) 9"):
        DatapathConfig(groups=9)
    with pytest.raises(ValueError, match="max_tokens"):
        DatapathConfig(max_tokens=70000)
    with pytest.raises(ValueError, match="memory word width"):
        ShrinkUnit(100)
    with pytest.raises(ValueError, match="shrink lane width 100"):
        ShrinkUnit(512, lane_bits=100)
    with pytest.raises(TypeError, match="DatapathConfig"):
        Unpack({"word_bits": 512})
