"""Host-side view of the datapath's interfaces: the memory layout of one job (the order the engine
reads words), the job descriptor and the result beats, as plain Python integers.

Used by the cocotb testbenches, the throughput benchmark and the host runtime's simulated board.
Segments: a job is a list of (count, key width, value width) segments (e.g. sink 16, body, window 16);
key and value blocks are re-cut at the union of their boundaries so both sides share segments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pmkvq_accel.model.attention import Partial, Query
from pmkvq_accel.model.quant import QuantizedKV, pack_codes, pack_metadata

from .attention import COUNT_BITS
from .config import DatapathConfig, lb_of


@dataclass(frozen=True)
class Segment:
    count: int
    kbits: int
    vbits: int


def _slice(b: QuantizedKV, a: int, e: int) -> QuantizedKV:
    return QuantizedKV(b.codes[a:e], b.scale[a:e], b.zero[a:e], b.bits)


def align_segments(keys: Sequence[QuantizedKV], values: Sequence[QuantizedKV]):
    """Cut key and value blocks at the union of their boundaries -> (segments, keys, values)."""
    def bounds(blocks):
        out, t = set(), 0
        for b in blocks:
            t += b.tokens
            out.add(t)
        return out, t
    kb, kt = bounds(keys)
    vb, vt = bounds(values)
    if kt != vt:
        raise ValueError(f"{kt} key tokens but {vt} value tokens")
    cuts = sorted(kb | vb)

    def recut(blocks):
        res, t0, i = [], 0, 0
        starts = []
        t = 0
        for b in blocks:
            starts.append(t)
            t += b.tokens
        prev = 0
        for c in cuts:
            # block containing [prev, c)
            for bi, b in enumerate(blocks):
                a = starts[bi]
                if a <= prev < a + b.tokens:
                    res.append(_slice(b, prev - a, c - a))
                    break
            prev = c
        return res
    ks, vs = recut(list(keys)), recut(list(values))
    segs = [Segment(k.tokens, k.bits, v.bits) for k, v in zip(ks, vs) if k.tokens > 0]
    ks = [k for k in ks if k.tokens > 0]
    vs = [v for v in vs if v.tokens > 0]
    return segs, ks, vs


def _words(raw: np.ndarray, word_bits: int) -> list[int]:
    wb = word_bits // 8
    return [int.from_bytes(raw[i:i + wb].tobytes(), "little") for i in range(0, raw.size, wb)]


def _meta_words(block: QuantizedKV, cfg: DatapathConfig) -> list[int]:
    meta = pack_metadata(block.scale, block.zero).astype("<u4")
    pad = (-meta.size) % cfg.mpw
    meta = np.concatenate([meta, np.zeros(pad, "<u4")])
    return _words(meta.view(np.uint8), cfg.word_bits)


def job_words(cfg: DatapathConfig, keys: Sequence[QuantizedKV], values: Sequence[QuantizedKV]) -> list[int]:
    """The memory words one job reads, in order (see hw/attention.py)."""
    segs, ks, vs = align_segments(keys, values)
    out: list[int] = []
    for k in ks:  # key pass: a metadata word, then the code words of its group of mpw tokens
        if k.head_dim != cfg.head_dim:
            raise ValueError(f"key head_dim {k.head_dim} != datapath head_dim {cfg.head_dim}")
        codes = _words(pack_codes(k.codes, k.bits, cfg.word_bits), cfg.word_bits)
        metas = _meta_words(k, cfg)
        per_group = cfg.group_code_words(k.bits)
        for g, mw in enumerate(metas):
            out.append(mw)
            ntok = min(cfg.mpw, k.tokens - g * cfg.mpw)
            n_words = -(-ntok * cfg.head_dim * k.bits // cfg.word_bits)
            out.extend(codes[g * per_group:g * per_group + n_words])
    for v in vs:
        out.extend(_meta_words(v, cfg))
    for v in vs:
        out.extend(_words(pack_codes(v.codes, v.bits, cfg.word_bits), cfg.word_bits))
    return out


def job_descriptor(cfg: DatapathConfig, query: Query, keys, values) -> int:
    """The `job` stream payload (hw.attention.job_layout) as an integer."""
    segs, _, _ = align_segments(keys, values)
    G, HD, NS = cfg.groups, cfg.head_dim, cfg.max_segments
    if query.codes.shape != (G, HD):
        raise ValueError(f"query shape {query.codes.shape} does not match G={G}, head_dim={HD}")
    if len(segs) > NS:
        raise ValueError(f"{len(segs)} segments; this datapath takes at most {NS}")
    if sum(s.count for s in segs) > cfg.max_tokens:
        raise ValueError(f"{sum(s.count for s in segs)} tokens exceed max_tokens={cfg.max_tokens}")
    val, pos = 0, 0

    def put(v, width):
        nonlocal val, pos
        val |= (int(v) & ((1 << width) - 1)) << pos
        pos += width
    for c in query.codes.reshape(-1):
        put(c, 16)
    for e in query.exp:
        if not -32768 <= int(e) < 32768:
            raise ValueError(f"query exponent {int(e)} out of the 16-bit range")
        put(e, 16)
    put(len(segs), 5)
    for i in range(NS):
        put(segs[i].count if i < len(segs) else 0, COUNT_BITS)
    for i in range(NS):
        put(lb_of(segs[i].kbits) if i < len(segs) else 0, 2)
    for i in range(NS):
        put(lb_of(segs[i].vbits) if i < len(segs) else 0, 2)
    return val


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) else v


def decode_result(cfg: DatapathConfig, payload: int) -> dict:
    """One `result` beat -> {head, m, l, e, acc (list)}."""
    head = payload & 7
    m = _signed((payload >> 3) & 0xFFFFFFFF, 32)
    l_ = (payload >> 35) & ((1 << 64) - 1)
    e = _signed((payload >> 99) & 0xFFFF, 16)
    acc_bits = payload >> 115
    acc = [_signed((acc_bits >> (64 * d)) & ((1 << 64) - 1), 64) for d in range(cfg.head_dim)]
    return {"head": head, "m": m, "l": l_, "e": e, "acc": acc}


def expected_beats(part: Partial) -> list[dict]:
    G = part.m.shape[0]
    return [{"head": g, "m": int(part.m[g]), "l": int(part.L[g]), "e": int(part.E),
             "acc": [int(a) for a in part.acc[g]]} for g in range(G)]
