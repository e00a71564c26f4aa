"""Block testbenches: Unpack, ScoreUnit, WeightUnit, ValueMac, each against the golden model, bit for bit,
under random valid gaps and backpressure. The pytest side (tests/sim/test_blocks.py) picks the block."""
from __future__ import annotations

import cocotb
import numpy as np
from cocotb.triggers import with_timeout

from pmkvq_accel.hw.config import DatapathConfig, lb_of
from pmkvq_accel.hw import jobs as J     # payload packing by layout, lanes, signed fields
from pmkvq_accel.hw.softmax import P_BITS, W_OUT, Z_OUT
from pmkvq_accel.model.attention import EXP2_TABLE, exp2_neg, scores
from pmkvq_accel.model.fixedpoint import bf16_fields, shift_round
from pmkvq_accel.model.formats import W_SHIFT_BIAS, Z_SHIFT_BIAS
from pmkvq_accel.model.quant import pack_codes, pack_metadata

from pmkvq_accel.sim.jobgen import random_job
from pmkvq_accel.sim.runner import tb_config
from pmkvq_accel.sim.tb_common import STALL_PATTERNS, TB

assert EXP2_TABLE.size == 257
# x = M - score whose interpolation product (T[i] - T[i+1]) r ends in exactly 0x80: the rounding tie of
# numerics.md's exp2 (`+ 128 >> 8`); random x reach one in ~256 lanes
_DL = EXP2_TABLE[:-1].astype(np.int64) - EXP2_TABLE[1:].astype(np.int64)
INTERP_TIES = np.array([(i << 8) | r for i in range(256) for r in range(256) if (int(_DL[i]) * r) & 0xFF == 0x80])


def _cfg():
    c = tb_config()
    return c, DatapathConfig(**c["dp"])


async def _bench(dut, c, unit):
    """The block's stream driver (source `i`, sink `o`) after reset, and the unit's payload layouts."""
    tb = TB(dut, sources=("i",), sinks=("o",), seed=c["seed"])
    await tb.reset()
    return tb, unit.i_layout, unit.o_layout


def token_beats(cfg: DatapathConfig, block):
    """Beats of c16 lanes for one block of tokens, as the controller feeds them:
    (c16 lanes list [nj*hd], ntok, wi, first, last, token indices)."""
    b, hd, nj = block.bits, cfg.head_dim, cfg.nj
    tpw = cfg.tpw(b)
    out = []
    if tpw >= 1:
        for t0 in range(0, block.tokens, tpw):
            toks = list(range(t0, min(block.tokens, t0 + tpw)))
            lanes = [0] * (nj * hd)
            for j, t in enumerate(toks):
                for d in range(hd):
                    lanes[j * hd + d] = int(block.codes[t, d]) << (16 - b)
            out.append((lanes, len(toks), 0, 1, 1, toks))
    else:
        per, wpt = cfg.word_bits // b, cfg.wpt(b)
        for t in range(block.tokens):
            for wi in range(wpt):
                lanes = [0] * (nj * hd)
                for d in range(wi * per, (wi + 1) * per):
                    lanes[d] = int(block.codes[t, d]) << (16 - b)
                out.append((lanes, 1, wi, int(wi == 0), int(wi == wpt - 1), [t]))
    return out


# ---------------------------------------------------------------------------------------------------
@cocotb.test()
async def test_unpack(dut):
    c, cfg = _cfg()
    if c["block"] != "unpack":
        return
    from pmkvq_accel.hw.unpack import unpack_layouts
    il, ol = unpack_layouts(cfg, c["tag_width"])
    rng = np.random.default_rng(c["seed"])
    W, hd, nj = cfg.word_bits, cfg.head_dim, cfg.nj
    beats, expect = [], []
    for n in range(c["beats"]):
        b = int(rng.choice([2, 4, 8, 16]))
        tpw = cfg.tpw(b)
        tokens = max(1, tpw)
        if tpw >= 1:
            ntok = int(rng.integers(0, tpw + 1)) if rng.random() < 0.3 else tpw
            wi = 0
        else:
            ntok, wi = int(rng.integers(0, 2)) if rng.random() < 0.2 else 1, int(rng.integers(0, cfg.wpt(b)))
        codes = rng.integers(0, 1 << b, size=(tokens, hd if tpw >= 1 else W // b))
        word = int.from_bytes(pack_codes(codes, b, W).tobytes(), "little")
        lanes = [0] * (nj * hd)
        for j in range(ntok if tpw >= 1 else 0):
            for d in range(hd):
                lanes[j * hd + d] = int(codes[j, d]) << (16 - b)
        if tpw == 0 and ntok:
            per = W // b
            for k in range(per):
                lanes[wi * per + k] = int(codes[0, k]) << (16 - b)
        tag = n & ((1 << c["tag_width"]) - 1)
        beats.append(J.pack_fields(il, word=word, lb=lb_of(b), wi=wi, ntok=ntok, tag=tag))
        expect.append((J.lanes(lanes, 16), tag))
    tb = TB(dut, sources=("i",), sinks=("o",), seed=c["seed"])
    await tb.reset()
    per = len(beats) // len(STALL_PATTERNS)
    for k, stalls in enumerate(STALL_PATTERNS):
        tb.set_stalls(*stalls)
        chunk = beats[k * per:(k + 1) * per]
        await tb.send("i", chunk)
        got = await with_timeout(tb.recv("o", len(chunk)), 100000, "ns")
        for n, raw in enumerate(got):
            o = J.unpack_fields(ol, raw)
            e_lanes, e_tag = expect[k * per + n]
            assert o["tag"] == e_tag, f"beat {k * per + n}: tag {o['tag']} != {e_tag}"
            assert o["c16"] == e_lanes, f"beat {k * per + n}: lanes differ"


# ---------------------------------------------------------------------------------------------------
@cocotb.test()
async def test_score(dut):
    c, cfg = _cfg()
    if c["block"] != "score":
        return
    from pmkvq_accel.hw.score import ScoreBlock
    tb, il, ol = await _bench(dut, c, ScoreBlock(cfg, c["tag_width"]))
    G, hd, nj = cfg.groups, cfg.head_dim, cfg.nj
    for n_job, spec in enumerate(c["jobs"]):
        rng = np.random.default_rng(c["seed"] * 100 + n_job)
        query, keys, _ = random_job(rng, G, hd, spec["tokens"], spec["kbits"], 2, spec.get("kind", "normal"))
        want = scores(query, keys)          # (G, T)
        dut.q.value = J.lanes(query.codes.reshape(-1), 16)
        dut.qexp.value = J.lanes(query.exp, 16)
        beats = [J.pack_fields(il, sq=1)]
        expect = []
        t_base = 0
        for blk in keys:
            meta = pack_metadata(blk.scale, blk.zero)
            for lanes, ntok, wi, first, last, toks in token_beats(cfg, blk):
                km = J.lanes([meta[t] for t in toks] + [0] * (nj - len(toks)), 32)
                tag = len(beats) & ((1 << c["tag_width"]) - 1)
                beats.append(J.pack_fields(il, c16=J.lanes(lanes, 16), kmeta=km, lb=lb_of(blk.bits), ntok=ntok,
                                           first=first, last=last, tag=tag))
                if last:
                    expect.append(([t_base + t for t in toks], tag))
            t_base += blk.tokens
        tb.set_stalls(*STALL_PATTERNS[n_job % len(STALL_PATTERNS)])
        await tb.send("i", beats)
        got = await with_timeout(tb.recv("o", len(expect)), 400 * len(beats) + 10000, "ns")
        for raw, (toks, tag) in zip(got, expect):
            o = J.unpack_fields(ol, raw)
            assert o["tag"] == tag and o["ntok"] == len(toks), f"job {n_job}: beat tag/ntok mismatch"
            for j, t in enumerate(toks):
                for g in range(G):
                    s = J.as_signed(J.lane(o["score"], j * G + g, 32), 32)
                    assert s == want[g, t], f"job {n_job} {spec}: token {t} head {g}: {s} != {want[g, t]}"


# ---------------------------------------------------------------------------------------------------
@cocotb.test()
async def test_weight(dut):
    c, cfg = _cfg()
    if c["block"] != "weight":
        return
    from pmkvq_accel.hw.softmax import WeightUnit
    tb, il, ol = await _bench(dut, c, WeightUnit(cfg, c["tag_width"]))
    G, hd, nj = cfg.groups, cfg.head_dim, cfg.value_slots   # the value pass's token slots
    for n_job, spec in enumerate(c["jobs"]):
        rng = np.random.default_rng(c["seed"] * 100 + n_job)
        _, _, values = random_job(rng, G, hd, spec["tokens"], 2, spec["vbits"], spec.get("kind", "normal"))
        M = rng.integers(-(1 << 31) + (1 << 30), 1 << 30, size=G)
        E_runs = []
        for blk in values:
            ms, xs = bf16_fields(blk.scale)
            mz, xz = bf16_fields(blk.zero)
            E_runs.append(np.max(np.maximum(xs + blk.bits, xz)))
        E = int(max(E_runs))
        dut.m.value = J.lanes(M, 32)
        dut.e.value = E & 0xFFF
        beats, expect = [], []
        for blk in values:
            tpw = max(1, cfg.value_tpw(blk.bits))     # tokens per value beat
            ms, xs = bf16_fields(blk.scale)
            mz, xz = bf16_fields(blk.zero)
            meta = pack_metadata(blk.scale, blk.zero)
            for t0 in range(0, blk.tokens, tpw):
                toks = list(range(t0, min(blk.tokens, t0 + tpw)))
                sc = np.zeros((nj, G), np.int64)
                for j in range(len(toks)):
                    kind = rng.random()
                    if kind < 0.1:
                        x = rng.integers(1 << 21, 1 << 32, size=G)    # far below the max: p = 0
                    elif kind < 0.2:
                        x = np.zeros(G, np.int64)                     # the maximum itself: p = 2^32
                    elif kind < 0.4:                                  # interpolation ties, n = 0..1
                        x = rng.choice(INTERP_TIES, size=G) | (rng.integers(0, 2, size=G) << 16)
                    else:
                        x = rng.integers(0, 1 << rng.integers(4, 22), size=G)
                    sc[j] = np.maximum(M - x, -(1 << 31) + 1)     # scores are 32-bit, saturated
                tag = len(beats) & ((1 << c["tag_width"]) - 1)
                beats.append(J.pack_fields(il, score=J.lanes(sc.reshape(-1), 32),
                                           vmeta=J.lanes([meta[t] for t in toks] + [0] * (nj - len(toks)), 32),
                                           lb=lb_of(blk.bits), ntok=len(toks), tag=tag))
                exp_lanes = []
                for j, t in enumerate(toks):
                    p = exp2_neg(M - sc[j])
                    w = shift_round(p * ms[t], E + W_SHIFT_BIAS - xs[t] - blk.bits)
                    z = shift_round(p * mz[t], E + Z_SHIFT_BIAS - xz[t])
                    exp_lanes.append((p, w, z))
                expect.append((exp_lanes, tag))
        tb.set_stalls(*STALL_PATTERNS[n_job % len(STALL_PATTERNS)])
        await tb.send("i", beats)
        got = await with_timeout(tb.recv("o", len(expect)), 400 * len(beats) + 10000, "ns")
        for raw, (lanes, tag) in zip(got, expect):
            o = J.unpack_fields(ol, raw)
            assert o["tag"] == tag
            for j, (p, w, z) in enumerate(lanes):
                for g in range(G):
                    k = j * G + g
                    gp, gw, gz = J.lane(o["p"], k, P_BITS), J.as_signed(J.lane(o["w"], k, W_OUT), W_OUT), \
                        J.as_signed(J.lane(o["z"], k, Z_OUT), Z_OUT)
                    assert (gp, gw, gz) == (p[g], w[g], z[g]), \
                        f"job {n_job}: lane {j} head {g}: got p,W,Z={gp},{gw},{gz} want {p[g]},{w[g]},{z[g]}"


# ---------------------------------------------------------------------------------------------------
@cocotb.test()
async def test_mac(dut):
    c, cfg = _cfg()
    if c["block"] != "mac":
        return
    from pmkvq_accel.hw.values import MacBlock
    tb, il, ol = await _bench(dut, c, MacBlock(cfg))
    G, hd, nj = cfg.groups, cfg.head_dim, cfg.value_slots   # the value pass's token slots
    rng = np.random.default_rng(c["seed"])
    for n_run, length in enumerate(c["runs"]):
        acc = np.zeros((G, hd), dtype=object)
        beats = []
        for n in range(length):
            b = int(rng.choice([2, 4, 8, 16]))
            c16 = (rng.integers(0, 1 << b, size=(nj, hd)) << (16 - b)).astype(object)
            if rng.random() < 0.1:
                c16[:] = 0xFFFF if b == 16 else ((1 << b) - 1) << (16 - b)     # extreme codes
            for j in range(nj):                 # a slot holds no tokens of this width: zero lanes (the unpacker)
                if b not in cfg.slot_widths(j):
                    c16[j] = 0
            w = rng.integers(0, 1 << 26, size=(nj, G)).astype(object)
            if rng.random() < 0.1:
                w[:] = (1 << 26) - 1
            z = rng.integers(-(1 << 42) + 1, 1 << 42, size=(nj, G)).astype(object)
            if rng.random() < 0.1:
                z[:] = rng.choice([-(1 << 42) + 1, (1 << 42) - 1])          # extreme Z
            z[rng.random(size=(nj, G)) < 0.3] = 0                           # lanes the caller masks
            for g in range(G):
                for j in range(nj):
                    acc[g] += w[j, g] * c16[j] - z[j, g]
            beats.append(J.pack_fields(il, c16=J.lanes(c16.reshape(-1), 16), w=J.lanes(w.reshape(-1), W_OUT),
                                       z=J.lanes(z.reshape(-1), Z_OUT), clear=int(n == 0), last=int(n == length - 1)))
        tb.set_stalls(*STALL_PATTERNS[n_run % len(STALL_PATTERNS)])
        await tb.send("i", beats)
        got = await with_timeout(tb.recv("o", 1), 400 * length + 10000, "ns")
        o = J.unpack_fields(ol, got[0])
        for g in range(G):
            for d in range(hd):
                v = J.as_signed(J.lane(o["acc"], g * hd + d, 64), 64)
                assert v == acc[g, d], f"run {n_run}: acc[{g}][{d}] {v} != {acc[g, d]}"


# ---------------------------------------------------------------------------------------------------
@cocotb.test()
async def test_shrink(dut):
    c = tb_config()
    if c["block"] != "shrink":
        return
    from pmkvq_accel.hw.shrink import ShrinkUnit
    from pmkvq_accel.model.fixedpoint import bf16_bits, bf16_round
    from pmkvq_accel.model.quant import shrink_codes, shrink_scale
    W = c["word_bits"]
    tb, il, ol = await _bench(dut, c, ShrinkUnit(W))     # the layouts (the same at every lane width)
    rng = np.random.default_rng(c["seed"])
    for n_blk, (tokens, hd, n) in enumerate(c["blocks"]):
        codes = rng.integers(0, 1 << (2 * n), size=(tokens, hd))
        codes[0, :] = (1 << (2 * n)) - 1                      # extreme codes
        codes[-1, :] = 0
        # scales: normal, tiny (subnormal), huge and rounding-tie cases, as real bf16 patterns
        sv = bf16_round(10.0 ** rng.uniform(-5, 5, size=tokens))
        scale = bf16_bits(sv)
        scale[: min(tokens, 3)] = np.array([0x0001, 0x007F, 0x0080][: min(tokens, 3)], np.uint16)
        zero = bf16_bits(bf16_round(rng.standard_normal(tokens)))
        words = _words_of(pack_codes(codes, 2 * n, W), W)
        metas = _words_of(_meta_bytes(scale, zero, W), W)
        lb = lb_of(n)
        beats = [J.pack_fields(il, data=w, kind=0, n_lb=lb, last=int(k == len(words) - 1)) for k, w in enumerate(words)]
        beats += [J.pack_fields(il, data=w, kind=1, n_lb=lb) for w in metas]
        want = _words_of(pack_codes(shrink_codes(codes, n), n, W), W)
        want_meta = _words_of(_meta_bytes(shrink_scale(scale, n), zero, W), W)
        tb.set_stalls(*STALL_PATTERNS[n_blk % len(STALL_PATTERNS)])
        await tb.send("i", beats)
        got = await with_timeout(tb.recv("o", len(want) + len(want_meta)), 200 * len(beats) + 10000, "ns")
        for k, raw in enumerate(got):
            o = J.unpack_fields(ol, raw)
            if k < len(want):
                assert o["kind"] == 0 and o["data"] == want[k], f"block {n_blk}: code word {k} differs"
            else:
                assert o["kind"] == 1 and o["data"] == want_meta[k - len(want)], \
                    f"block {n_blk}: metadata word {k - len(want)} differs"


def _words_of(raw, W):
    wb = W // 8
    return [int.from_bytes(raw[i:i + wb].tobytes(), "little") for i in range(0, raw.size, wb)]


def _meta_bytes(scale, zero, W):
    meta = pack_metadata(scale, zero).astype("<u4")
    meta = np.concatenate([meta, np.zeros((-meta.size) % (W // 32), "<u4")])
    return meta.view(np.uint8)
