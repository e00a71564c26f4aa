// The whole kernel (pmkvq_attn) on Verilator as a long-running process: the host's simulated board.
//
// The host (sim/kernel_sim.py) talks over stdin/stdout, one command line each, byte payloads raw:
//   A addr n          add an n-byte memory region at addr (zeroed)           -> "ok"
//   W addr n\n<n B>   write bytes                                            -> "ok" | "err ..."
//   R addr n          read bytes                                             -> "ok\n<n B>" | "err ..."
//   S off value       AXI4-Lite register write                               -> "ok"
//   G off             AXI4-Lite register read                                -> "<value>"
//   P off mask limit  read the register until (value & mask) or limit cycles -> "<value>"
//   C                 -> "<cycles> <kernel cycles> <launches> <faults> <first fault address>"
//   Q                 quit
// Memory: every m_axi_gmem port sees the same byte-addressed memory (HBM behind the U280's switch);
// a read burst's first beat comes `latency` cycles after its address, then one beat per cycle, any
// number of bursts in flight; a write is acknowledged `latency` cycles after its last beat. An access
// outside every region is answered with SLVERR and counted as a fault.
// Kernel cycles: from the AXI4-Lite write that sets ap_start to the read that sees ap_done.
#include "Vtop.h"
#include "verilated.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <vector>

double sc_time_stamp() { return 0; }

struct Port {        // one AXI4 master of the kernel, as pointers into the Verilated model
    CData *arvalid, *arready, *arlen, *arsize, *arburst, *rvalid, *rready, *rlast, *rresp;
    CData *awvalid, *awready, *awlen, *awsize, *awburst, *wvalid, *wready, *wlast, *bvalid, *bready, *bresp;
    QData *araddr, *awaddr;
    uint32_t *rdata, *wdata;
    std::function<uint64_t()> wstrb;
};

#include "harness_ports.h"   // generated: WORD_BYTES, ENGINES, bind_ports(top, ports)

struct Burst { uint64_t addr; unsigned beats, done; uint64_t ready_at; bool err; };

struct Memory {
    std::map<uint64_t, std::vector<uint8_t>> regions;
    uint64_t faults = 0, first_fault = 0;

    uint8_t* find(uint64_t addr, uint64_t n) {
        auto it = regions.upper_bound(addr);
        if (it == regions.begin()) return nullptr;
        --it;
        if (addr + n > it->first + it->second.size()) return nullptr;
        return it->second.data() + (addr - it->first);
    }
    void fault(uint64_t addr) { if (!faults++) first_fault = addr; }
};

struct Harness {
    Vtop* top;
    Memory mem;
    Port ports[ENGINES];
    std::deque<Burst> rq[ENGINES], wq[ENGINES], bq[ENGINES];
    bool rerr[ENGINES] = {}, berr[ENGINES] = {};
    uint64_t cycle = 0, latency, start_cycle = 0, kernel_cycles = 0, launches = 0;
    bool running = false;
    bool lite_aw = false, lite_w = false, lite_b = false, lite_ar = false, lite_r = false;
    uint32_t lite_rdata = 0;

    explicit Harness(uint64_t lat) : latency(lat) {
        top = new Vtop;
        bind_ports(top, ports);
        top->s_axi_control_awvalid = top->s_axi_control_wvalid = top->s_axi_control_bready = 0;
        top->s_axi_control_arvalid = top->s_axi_control_rready = 0;
        top->ap_rst_n = 0;
        for (int i = 0; i < 8; ++i) step();
        top->ap_rst_n = 1;
        for (int i = 0; i < 2; ++i) step();
    }

    // Drive the memory side from its state, settle, sample every handshake, clock edge.
    void step() {
        for (int e = 0; e < ENGINES; ++e) {
            Port& p = ports[e];
            *p.arready = rq[e].size() < 64;
            *p.awready = wq[e].size() < 64;
            *p.wready = !wq[e].empty();
            bool rv = !rq[e].empty() && rq[e].front().ready_at <= cycle;
            *p.rvalid = rv;
            if (rv) {
                Burst& b = rq[e].front();
                uint64_t a = b.addr + (uint64_t)b.done * WORD_BYTES;
                uint8_t* src = mem.find(a, WORD_BYTES);
                if (src) std::memcpy(p.rdata, src, WORD_BYTES);
                else { std::memset(p.rdata, 0, WORD_BYTES); if (!rerr[e]) mem.fault(a); rerr[e] = true; }
                *p.rlast = b.done + 1 == b.beats;
                *p.rresp = src ? 0 : 2;
            }
            bool bv = !bq[e].empty() && bq[e].front().ready_at <= cycle;
            *p.bvalid = bv;
            *p.bresp = bv && bq[e].front().err ? 2 : 0;
        }
        top->ap_clk = 0;
        top->eval();
        lite_aw = top->s_axi_control_awvalid && top->s_axi_control_awready;
        lite_w = top->s_axi_control_wvalid && top->s_axi_control_wready;
        lite_b = top->s_axi_control_bvalid && top->s_axi_control_bready;
        lite_ar = top->s_axi_control_arvalid && top->s_axi_control_arready;
        lite_r = top->s_axi_control_rvalid && top->s_axi_control_rready;
        lite_rdata = top->s_axi_control_rdata;
        for (int e = 0; e < ENGINES; ++e) {
            Port& p = ports[e];
            if (*p.arvalid && *p.arready) {
                if (*p.arburst != 1 || (1u << *p.arsize) != WORD_BYTES) mem.fault(*p.araddr);
                rq[e].push_back({*p.araddr, (unsigned)*p.arlen + 1, 0, cycle + latency, false});
            }
            if (*p.rvalid && *p.rready) {
                Burst& b = rq[e].front();
                if (++b.done == b.beats) { rq[e].pop_front(); rerr[e] = false; }
            }
            if (*p.awvalid && *p.awready) {
                if (*p.awburst != 1 || (1u << *p.awsize) != WORD_BYTES) mem.fault(*p.awaddr);
                wq[e].push_back({*p.awaddr, (unsigned)*p.awlen + 1, 0, 0, false});
            }
            if (*p.wvalid && *p.wready) {
                Burst& b = wq[e].front();
                uint64_t a = b.addr + (uint64_t)b.done * WORD_BYTES;
                uint8_t* dst = mem.find(a, WORD_BYTES);
                const uint8_t* src = reinterpret_cast<const uint8_t*>(p.wdata);
                uint64_t strb = p.wstrb();
                if (dst) { for (unsigned i = 0; i < WORD_BYTES; ++i) if (strb >> i & 1) dst[i] = src[i]; }
                else { if (!berr[e]) mem.fault(a); berr[e] = true; }
                if (++b.done == b.beats || *p.wlast) {
                    if (!(*p.wlast && b.done == b.beats)) mem.fault(b.addr);   // WLAST must end the burst
                    bq[e].push_back({b.addr, 0, 0, cycle + latency, berr[e]});
                    berr[e] = false;
                    wq[e].pop_front();
                }
            }
            if (*p.bvalid && *p.bready) bq[e].pop_front();
        }
        top->ap_clk = 1;
        top->eval();
        ++cycle;
    }

    void lite_write(uint32_t off, uint32_t value) {
        top->s_axi_control_awaddr = off;
        top->s_axi_control_wdata = value;
        top->s_axi_control_wstrb = 0xF;
        top->s_axi_control_awvalid = top->s_axi_control_wvalid = top->s_axi_control_bready = 1;
        for (bool done = false; !done;) {
            step();
            if (lite_aw) top->s_axi_control_awvalid = 0;
            if (lite_w) top->s_axi_control_wvalid = 0;
            done = lite_b;
        }
        top->s_axi_control_bready = 0;
        if (off == 0 && (value & 1)) { running = true; start_cycle = cycle; ++launches; }
    }

    uint32_t lite_read(uint32_t off) {
        top->s_axi_control_araddr = off;
        top->s_axi_control_arvalid = top->s_axi_control_rready = 1;
        for (bool done = false; !done;) {
            step();
            if (lite_ar) top->s_axi_control_arvalid = 0;
            done = lite_r;
        }
        top->s_axi_control_rready = 0;
        uint32_t value = lite_rdata;
        if (off == 0 && (value & 2) && running) { running = false; kernel_cycles += cycle - start_cycle; }
        return value;
    }
};

static bool read_exact(char* buf, size_t n) {
    return std::fread(buf, 1, n, stdin) == n;
}

int main(int argc, char** argv) {
    Verilated::commandArgs(argc, argv);
    uint64_t latency = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 100;
    Harness h(latency);
    char line[256];
    std::vector<char> buf;
    while (std::fgets(line, sizeof line, stdin)) {
        char op = line[0];
        unsigned long long a = 0, b = 0, c = 0;
        std::sscanf(line + 1, "%llu %llu %llu", &a, &b, &c);
        if (op == 'A') {
            h.mem.regions[a].assign(b, 0);
            std::printf("ok\n");
        } else if (op == 'W' || op == 'R') {
            uint8_t* p = h.mem.find(a, b);
            if (op == 'W') {
                buf.resize(b);
                if (!read_exact(buf.data(), b)) return 1;
                if (p) std::memcpy(p, buf.data(), b);
            }
            if (!p) { std::printf("err %llu bytes at %#llx are outside device memory\n", b, a); }
            else if (op == 'W') std::printf("ok\n");
            else { std::printf("ok\n"); std::fwrite(p, 1, b, stdout); }
        } else if (op == 'S') {
            h.lite_write((uint32_t)a, (uint32_t)b);
            std::printf("ok\n");
        } else if (op == 'G') {
            std::printf("%u\n", h.lite_read((uint32_t)a));
        } else if (op == 'P') {
            uint64_t until = h.cycle + c;
            uint32_t v;
            do v = h.lite_read((uint32_t)a); while (!(v & b) && h.cycle < until);
            std::printf("%u\n", v);
        } else if (op == 'C') {
            std::printf("%llu %llu %llu %llu %llu\n", (unsigned long long)h.cycle,
                        (unsigned long long)h.kernel_cycles, (unsigned long long)h.launches,
                        (unsigned long long)h.mem.faults, (unsigned long long)h.mem.first_fault);
        } else if (op == 'Q') {
            break;
        } else {
            std::printf("err unknown command %c\n", op);
        }
        std::fflush(stdout);
    }
    h.top->final();
    delete h.top;
    return 0;
}
