// The whole kernel (pmkvq_attn) on Verilator as a long-running process: the host's simulated board.
//
// Usage: harness [latency [cross_latency pc_bytes_per_cycle cross_factor]]   (sim/hbm.py HbmModel.harness_args)
// The host (sim/kernel_sim.py) talks over stdin/stdout, one command line each, byte payloads raw:
//   A addr n [pc]     add an n-byte memory region at addr (zeroed) in HBM pseudo-channel pc (default 0) -> "ok"
//   H e mask          engine e's own pseudo-channels (bit p: PC p)                    -> "ok"
//   W addr n\n<n B>   write bytes                                            -> "ok" | "err ..."
//   R addr n          read bytes                                             -> "ok\n<n B>" | "err ..."
//   S off value       AXI4-Lite register write                               -> "ok"
//   G off             AXI4-Lite register read                                -> "<value>"
//   P off mask limit  read the register until (value & mask) or limit cycles -> "<value>"
//   C                 -> "<cycles> <kernel cycles> <launches> <faults> <first fault address>"
//   T e               engine e's R channel since the last ap_start ->
//                     "<beats> <first beat cycle> <last beat cycle> <cross-PC beats> <write beats>"
//   Q                 quit
// Memory (the HBM model of sim/hbm.py): every m_axi_gmem port sees the same byte-addressed memory; each
// region lies in one pseudo-channel (PC). Each PC is a token bucket shared by all ports: it earns
// pc_bytes_per_cycle bytes a cycle (capped at one cycle's worth plus one cross beat), a read or write beat
// takes WORD_BYTES from the bucket of the PC its burst starts in, or WORD_BYTES * cross_factor when that PC
// is not one of the port's own (H). A read beat is offered only when its PC has the bytes; a write beat is
// accepted whenever its address has been, and pays on transfer (the bucket may go into debt). A read burst's first beat comes `latency` cycles after its address (+ cross_latency
// for another engine's PC), then at most one beat per cycle, in order, up to 64 bursts queued per port; a
// write is acknowledged `latency` cycles after its last beat. An access outside every region is answered
// with SLVERR, counted as a fault and takes no bandwidth. Without the bandwidth arguments the memory has a
// fixed latency and no bandwidth limit (the former model).
// Kernel cycles: from the AXI4-Lite write that sets ap_start to the read that sees ap_done.
#include "Vtop.h"
#include "verilated.h"

#include <algorithm>
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

struct Burst { uint64_t addr; unsigned beats, done; uint64_t ready_at; bool err; int pc; double cost; };

struct Region { std::vector<uint8_t> bytes; int pc; };

struct Memory {
    std::map<uint64_t, Region> regions;
    uint64_t faults = 0, first_fault = 0;

    uint8_t* find(uint64_t addr, uint64_t n, int* pc = nullptr) {
        auto it = regions.upper_bound(addr);
        if (it == regions.begin()) return nullptr;
        --it;
        if (addr + n > it->first + it->second.bytes.size()) return nullptr;
        if (pc) *pc = it->second.pc;
        return it->second.bytes.data() + (addr - it->first);
    }
    int pc_of(uint64_t addr) { int pc = -1; find(addr, 1, &pc); return pc; }   // -1: outside every region
    void fault(uint64_t addr) { if (!faults++) first_fault = addr; }
};

constexpr int PCS = 32;

struct Stats { uint64_t beats = 0, first = 0, last = 0, cross = 0, wbeats = 0; };

struct Harness {
    Vtop* top;
    Memory mem;
    Port ports[ENGINES];
    std::deque<Burst> rq[ENGINES], wq[ENGINES], bq[ENGINES];
    bool rerr[ENGINES] = {}, berr[ENGINES] = {};
    uint64_t cycle = 0, latency, cross_latency, start_cycle = 0, kernel_cycles = 0, launches = 0;
    bool limited;                       // false: no bandwidth limit (fixed-latency memory)
    double pc_rate, cross_cost, credit[PCS], cap;
    uint32_t home[ENGINES];             // bit p: PC p is one of engine e's own
    Stats stats[ENGINES];
    bool r_offer[ENGINES] = {};
    unsigned rr = 0;                    // port served first this cycle (round robin)
    bool running = false;
    bool lite_aw = false, lite_w = false, lite_b = false, lite_ar = false, lite_r = false;
    uint32_t lite_rdata = 0;

    Harness(uint64_t lat, uint64_t cross_lat, double rate, double cross)
        : latency(lat), cross_latency(cross_lat), limited(rate > 0), pc_rate(rate), cross_cost(cross) {
        cap = rate + std::max(cross, (double)WORD_BYTES);
        for (int p = 0; p < PCS; ++p) credit[p] = 0;
        for (int e = 0; e < ENGINES; ++e) home[e] = 1u << (e % PCS);
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
    // every PC is alike without a bandwidth limit (no cross penalty, no cross beats counted)
    bool is_home(int e, int pc) const { return !limited || pc < 0 || (home[e] >> pc & 1); }
    double beat_cost(int e, int pc) const { return is_home(e, pc) ? (double)WORD_BYTES : cross_cost; }
    // take a read beat's cost from its PC's bucket (refunded if the beat is not transferred this cycle)
    bool reserve(int pc, double cost) {
        if (!limited || pc < 0) return true;
        if (credit[pc] + 1e-9 < cost) return false;
        credit[pc] -= cost;
        return true;
    }
    void refund(int pc, double cost) { if (limited && pc >= 0) credit[pc] += cost; }

    void step() {
        if (limited)
            for (int p = 0; p < PCS; ++p) credit[p] = std::min(credit[p] + pc_rate, cap);
        for (int i = 0; i < ENGINES; ++i) {
            int e = (int)((rr + i) % ENGINES);
            Port& p = ports[e];
            *p.arready = rq[e].size() < 64;
            *p.awready = wq[e].size() < 64;
            *p.wready = !wq[e].empty();     // a write beat pays its PC on transfer (may leave a debt)
            bool rv = !rq[e].empty() && rq[e].front().ready_at <= cycle
                      && reserve(rq[e].front().pc, rq[e].front().cost);
            r_offer[e] = rv;
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
            if (r_offer[e] && !*p.rready) refund(rq[e].front().pc, rq[e].front().cost);
            if (*p.arvalid && *p.arready) {
                if (*p.arburst != 1 || (1u << *p.arsize) != WORD_BYTES) mem.fault(*p.araddr);
                int pc = mem.pc_of(*p.araddr);
                uint64_t lat = latency + (is_home(e, pc) ? 0 : cross_latency);
                rq[e].push_back({*p.araddr, (unsigned)*p.arlen + 1, 0, cycle + lat, false, pc, beat_cost(e, pc)});
            }
            if (*p.rvalid && *p.rready) {
                Burst& b = rq[e].front();
                Stats& st = stats[e];
                if (!st.beats++) st.first = cycle;
                st.last = cycle;
                if (!is_home(e, b.pc)) ++st.cross;
                if (++b.done == b.beats) { rq[e].pop_front(); rerr[e] = false; }
            }
            if (*p.awvalid && *p.awready) {
                if (*p.awburst != 1 || (1u << *p.awsize) != WORD_BYTES) mem.fault(*p.awaddr);
                int pc = mem.pc_of(*p.awaddr);
                wq[e].push_back({*p.awaddr, (unsigned)*p.awlen + 1, 0, 0, false, pc, beat_cost(e, pc)});
            }
            if (*p.wvalid && *p.wready) {
                ++stats[e].wbeats;
                if (limited && wq[e].front().pc >= 0) credit[wq[e].front().pc] -= wq[e].front().cost;
                Burst& b = wq[e].front();
                uint64_t a = b.addr + (uint64_t)b.done * WORD_BYTES;
                uint8_t* dst = mem.find(a, WORD_BYTES);
                const uint8_t* src = reinterpret_cast<const uint8_t*>(p.wdata);
                uint64_t strb = p.wstrb();
                if (dst) { for (unsigned i = 0; i < WORD_BYTES; ++i) if (strb >> i & 1) dst[i] = src[i]; }
                else { if (!berr[e]) mem.fault(a); berr[e] = true; }
                if (++b.done == b.beats || *p.wlast) {
                    if (!(*p.wlast && b.done == b.beats)) mem.fault(b.addr);   // WLAST must end the burst
                    bq[e].push_back({b.addr, 0, 0, cycle + latency, berr[e], b.pc, 0});
                    berr[e] = false;
                    wq[e].pop_front();
                }
            }
            if (*p.bvalid && *p.bready) bq[e].pop_front();
        }
        top->ap_clk = 1;
        top->eval();
        ++cycle;
        rr = (rr + 1) % ENGINES;
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
        if (off == 0 && (value & 1)) {
            running = true; start_cycle = cycle; ++launches;
            for (int e = 0; e < ENGINES; ++e) stats[e] = Stats();
        }
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
    uint64_t cross_latency = argc > 4 ? std::strtoull(argv[2], nullptr, 0) : 0;
    double rate = argc > 4 ? std::strtod(argv[3], nullptr) : 0;       // 0: no bandwidth limit
    double cross = argc > 4 ? std::strtod(argv[4], nullptr) * WORD_BYTES : WORD_BYTES;
    Harness h(latency, cross_latency, rate, cross);
    char line[256];
    std::vector<char> buf;
    while (std::fgets(line, sizeof line, stdin)) {
        char op = line[0];
        unsigned long long a = 0, b = 0, c = 0;
        int nargs = std::sscanf(line + 1, "%llu %llu %llu", &a, &b, &c);
        if (op == 'A') {
            if (nargs >= 3 && c >= PCS) { std::printf("err pseudo-channel %llu is not 0..%d\n", c, PCS - 1); }
            else {
                Region& r = h.mem.regions[a];
                r.bytes.assign(b, 0);
                r.pc = nargs >= 3 ? (int)c : 0;
                std::printf("ok\n");
            }
        } else if (op == 'H') {
            if (a >= (unsigned long long)ENGINES) std::printf("err engine %llu is not 0..%d\n", a, ENGINES - 1);
            else { h.home[a] = (uint32_t)b; std::printf("ok\n"); }
        } else if (op == 'T') {
            if (a >= (unsigned long long)ENGINES) std::printf("err engine %llu is not 0..%d\n", a, ENGINES - 1);
            else {
                Stats& st = h.stats[a];
                std::printf("%llu %llu %llu %llu %llu\n", (unsigned long long)st.beats, (unsigned long long)st.first,
                            (unsigned long long)st.last, (unsigned long long)st.cross, (unsigned long long)st.wbeats);
            }
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
