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

from .attention import result_layout
from .config import DatapathConfig, lb_of
from .control import COUNT_BITS, job_layout
from .values import ACC_BITS


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
        res = []
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


def job_beats(cfg: DatapathConfig, keys: Sequence[QuantizedKV], values: Sequence[QuantizedKV]) -> int:
    """The datapath's beats (cycles at full rate) for a job: one per word of `job_words`, and a second one for
    every value word holding more tokens than the value pass has slots (`DatapathConfig.value_halves`)."""
    segs, ks, vs = align_segments(keys, values)
    extra = 0
    for v in vs:
        if cfg.value_halves(v.bits) == 2:
            tpw = cfg.tpw(v.bits)
            for g in range(-(-v.tokens // cfg.mpw)):
                full, rest = divmod(min(cfg.mpw, v.tokens - g * cfg.mpw), tpw)
                extra += full + (rest > cfg.value_slots)
    return len(job_words(cfg, keys, values)) + extra


def pack_fields(layout, **fields) -> int:
    """A payload of `layout` (an amaranth data.StructLayout) as an integer: each field at its offset, masked
    to its width; fields not given are zero."""
    unknown = set(fields) - {name for name, _ in layout}
    if unknown:
        raise ValueError(f"no field {sorted(unknown)} in the layout")
    v = 0
    for name, f in layout:
        v |= (int(fields.get(name, 0)) & ((1 << f.width) - 1)) << f.offset
    return v


def unpack_fields(layout, value: int) -> dict:
    """An integer payload of `layout` -> {field: unsigned value}."""
    return {name: (value >> f.offset) & ((1 << f.width) - 1) for name, f in layout}


def lanes(values, width: int) -> int:
    """Equal-width lanes (lane i at bit i * width, each masked to width) as one integer."""
    out = 0
    for i, v in enumerate(values):
        out |= (int(v) & ((1 << width) - 1)) << (i * width)
    return out


def lane(value: int, i: int, width: int) -> int:
    """Lane i of `lanes`' packing (unsigned)."""
    return (value >> (i * width)) & ((1 << width) - 1)


def as_signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) & 1 else v


def job_descriptor(cfg: DatapathConfig, query: Query, keys, values) -> int:
    """The `job` stream payload (hw.control.job_layout) as an integer."""
    segs, _, _ = align_segments(keys, values)
    G, HD, NS = cfg.groups, cfg.head_dim, cfg.max_segments
    if query.codes.shape != (G, HD):
        raise ValueError(f"query shape {query.codes.shape} does not match G={G}, head_dim={HD}")
    if len(segs) > NS:
        raise ValueError(f"{len(segs)} segments; this datapath takes at most {NS}")
    if sum(s.count for s in segs) > cfg.max_tokens:
        raise ValueError(f"{sum(s.count for s in segs)} tokens exceed max_tokens={cfg.max_tokens}")
    for e in query.exp:
        if not -32768 <= int(e) < 32768:
            raise ValueError(f"query exponent {int(e)} out of the 16-bit range")
    pad = [Segment(0, 2, 2)] * (NS - len(segs))     # unused segment slots: zero (width code 0)
    segs = list(segs) + pad
    return pack_fields(job_layout(cfg), q=lanes(query.codes.reshape(-1), 16), qexp=lanes(query.exp, 16),
                       nseg=len(segs) - len(pad), count=lanes([s.count for s in segs], COUNT_BITS),
                       klb=lanes([lb_of(s.kbits) for s in segs], 2), vlb=lanes([lb_of(s.vbits) for s in segs], 2))


def decode_result(cfg: DatapathConfig, payload: int) -> dict:
    """One `result` beat (hw.attention.result_layout) -> head `head`'s {head, m, l, e, acc (list)}."""
    f = unpack_fields(result_layout(cfg), payload)
    g, HD = f["head"], cfg.head_dim
    if not 0 <= g < cfg.groups:
        raise ValueError(f"result beat for head {g}: the datapath has {cfg.groups}")
    return {"head": g, "m": as_signed(lane(f["m"], g, 32), 32), "l": lane(f["l"], g, 64),
            "e": as_signed(f["e"], 16),
            "acc": [as_signed(lane(f["acc"], g * HD + d, ACC_BITS), ACC_BITS) for d in range(HD)]}


def expected_beats(part: Partial) -> list[dict]:
    G = part.m.shape[0]
    return [{"head": g, "m": int(part.m[g]), "l": int(part.L[g]), "e": int(part.E),
             "acc": [int(a) for a in part.acc[g]]} for g in range(G)]
