"""The datapath's on-chip token buffers: one entry per group of mpw tokens, lane t of an entry is token t
of the group. The key pass writes the scores (`ScoreBuffer`), the value-metadata words are stored as they
arrive (`MetaBuffer`); the value pass reads both at the same entry and takes the lanes gl .. gl + nv - 1 of
its beat (nv = `cfg.value_slots`). Reads are synchronous: `rgl` is the lane of the word whose `raddr` was given a cycle earlier."""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Module, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .arith import kept
from .config import BY_CODE, DatapathConfig


def _ports(cfg: DatapathConfig, lane_bits: int, what: str) -> dict:
    if not isinstance(cfg, DatapathConfig):
        raise TypeError(f"{what} needs a DatapathConfig, got {cfg!r}")
    f = cfg.field_bits
    return {"waddr": In(f["entry"]), "raddr": In(f["entry"]), "rgl": In(f["gl"]), "lanes": Out(cfg.value_slots * lane_bits)}


def _read_lanes(cfg, rd_data, lane_bits, rgl):
    lanes = Array(rd_data[i * lane_bits:(i + 1) * lane_bits] for i in range(cfg.mpw))
    return Cat(*[lanes[rgl + j] for j in range(cfg.value_slots)])


class ScoreBuffer(wiring.Component):
    """The scores of a run, G x 32 bits per token lane. A write (`valid`) puts the word's `ntok` scores
    (token j of the word in the score unit's lane j) into lanes gl .. gl + ntok - 1 of entry `waddr`; `lb`
    says how the word's tokens sit in the score unit's lanes (token t of the group in lane t mod tpw)."""

    def __init__(self, cfg: DatapathConfig):
        self.cfg = cfg
        ports = _ports(cfg, cfg.groups * 32, "ScoreBuffer")
        super().__init__({**ports, "valid": In(1), "score": In(cfg.nj * cfg.groups * 32),
                          "ntok": In(cfg.field_bits["ntok"]), "gl": In(cfg.field_bits["gl"]), "lb": In(2)})

    def elaborate(self, platform):
        cfg = self.cfg
        MPW, NJ, G = cfg.mpw, cfg.nj, cfg.groups
        m = Module()
        m.submodules.mem = mem = Memory(shape=unsigned(MPW * G * 32), depth=cfg.entries, init=[])
        wr = mem.write_port(granularity=G * 32)
        rd = mem.read_port()
        sc = self.score
        # lane `lane` takes token j of the word iff gl + j == lane and j < ntok: a decode of gl (kept) and
        # the token flags, so that the lane enables do not come out of ABC as compares chained through each other
        gl_hot = [kept(m, self.gl == i, unsigned(1), "sw_gl") for i in range(MPW)]
        tok_in = [kept(m, self.ntok > j, unsigned(1), "sw_tok") for j in range(NJ)]
        wdata, wen = [], []
        for lane in range(MPW):
            cands = []
            for w in BY_CODE:
                t = cfg.tpw(w.bits)
                j = lane % t if t >= 1 else 0
                cands.append(sc[j * G * 32:(j + 1) * G * 32])
            wdata.append(Array(cands)[self.lb])
            hits = [tok_in[j] & gl_hot[lane - j] for j in range(min(NJ, lane + 1))]
            # pairs of terms as kept LUTs (the whole OR came out of ABC as a chain of 2-input LUTs)
            hit = Cat(*[kept(m, Cat(*hits[i:i + 2]).any(), unsigned(1), "sw_hit") for i in range(0, len(hits), 2)])
            wen.append(self.valid & hit.any())
        m.d.comb += [wr.addr.eq(self.waddr), wr.data.eq(Cat(*wdata)), wr.en.eq(Cat(*wen)),
                     rd.en.eq(1), rd.addr.eq(self.raddr),
                     self.lanes.eq(_read_lanes(cfg, rd.data, G * 32, self.rgl))]
        return m


class MetaBuffer(wiring.Component):
    """The value-metadata words of a run (32 bits per token lane: scale | zero << 16), written whole."""

    def __init__(self, cfg: DatapathConfig):
        self.cfg = cfg
        super().__init__({**_ports(cfg, 32, "MetaBuffer"), "we": In(1), "wdata": In(cfg.word_bits)})

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        m.submodules.mem = mem = Memory(shape=unsigned(cfg.word_bits), depth=cfg.entries, init=[])
        wr = mem.write_port()
        rd = mem.read_port()
        m.d.comb += [wr.addr.eq(self.waddr), wr.data.eq(self.wdata), wr.en.eq(self.we),
                     rd.en.eq(1), rd.addr.eq(self.raddr),
                     self.lanes.eq(_read_lanes(cfg, rd.data, 32, self.rgl))]
        return m
