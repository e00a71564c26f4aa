"""Host-side view used by the kernel testbenches: build a device-memory image of one layer's KV heads per
docs/kernel-interface.md, the register values of a launch, and the expected partial records."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmkvq_accel.hw import regmap as R
from pmkvq_accel.model.attention import Query, attention_partial
from pmkvq_accel.model.quant import QuantizedKV, pack_codes, pack_metadata

W = R.WORD_BYTES


def align(n: int) -> int:
    return R.ceil_words(n)


def meta_bytes(block: QuantizedKV | None) -> bytes:
    if block is None or block.tokens == 0:
        return b""
    words = pack_metadata(block.scale, block.zero).astype("<u4")
    return words.tobytes()


def code_bytes(block: QuantizedKV | None) -> bytes:
    if block is None or block.tokens == 0:
        return b""
    return pack_codes(block.codes, block.bits, R.WORD_BITS).tobytes()


@dataclass
class Head:
    """One KV head: (sink, body, window) blocks for keys and values, and its G-head query."""
    keys: tuple
    values: tuple
    query: Query


def build_image(heads: list[Head], base: int = 0x10000, sink_cap: int = 1, window_cap: int = 128,
                body_cap: int = 2048):
    """Lay out heads as the contract says; return (memory bytes dict addr->bytes, args dict)."""
    head_dim = heads[0].query.codes.shape[1]
    G = heads[0].query.codes.shape[0]
    sink_b = align(sink_cap * head_dim * 2)
    win_b = align(window_cap * head_dim * 2)
    body_b = align(body_cap * head_dim * 2)
    codes_stride = sink_b + win_b + body_b
    msink, mwin, mbody = align(4 * sink_cap), align(4 * window_cap), align(4 * body_cap)
    meta_stride = msink + mwin + mbody
    n = len(heads)
    k_codes = base
    v_codes = k_codes + n * codes_stride
    k_meta = v_codes + n * codes_stride
    v_meta = k_meta + n * meta_stride
    query = v_meta + n * meta_stride
    qrec = R.query_record_bytes(head_dim)
    partial = align(query + n * G * qrec)
    mem = {}
    for h, hd in enumerate(heads):
        for kind, blocks, codes_base, meta_base in (("k", hd.keys, k_codes, k_meta), ("v", hd.values, v_codes, v_meta)):
            sink, body, window = blocks
            cb = codes_base + h * codes_stride
            mb = meta_base + h * meta_stride
            mem[cb] = code_bytes(sink)
            mem[cb + sink_b + win_b] = code_bytes(body)
            mem[cb + sink_b] = code_bytes(window)
            mem[mb] = meta_bytes(sink)
            mem[mb + msink + mwin] = meta_bytes(body)
            mem[mb + msink] = meta_bytes(window)
        for g in range(G):
            rec = np.zeros(qrec, np.uint8)
            rec[:2 * head_dim] = hd.query.codes[g].astype("<i2").view(np.uint8)
            rec[2 * head_dim:2 * head_dim + 4] = np.array([hd.query.exp[g]], "<i4").view(np.uint8)
            mem[query + (h * G + g) * qrec] = rec.tobytes()
    sink, body, window = heads[0].keys
    vbody = heads[0].values[1]
    args = dict(op=R.OP_ATTENTION, kind=0, n_heads=n, group=G, head_dim=head_dim,
                n_sink=_tokens(sink), n_body=_tokens(body), n_window=_tokens(window),
                k_bits=body.bits if body is not None else 16, v_bits=vbody.bits if vbody is not None else 16,
                k_codes=k_codes, v_codes=v_codes, k_meta=k_meta, v_meta=v_meta, query=query, partial=partial,
                k_window_off=sink_b, k_body_off=sink_b + win_b, v_window_off=sink_b, v_body_off=sink_b + win_b,
                k_codes_stride=codes_stride, v_codes_stride=codes_stride, meta_stride=meta_stride,
                meta_window_off=msink, meta_body_off=msink + mwin)
    end = partial + n * G * R.partial_record_bytes(head_dim)
    return mem, args, end


def _tokens(b):
    return 0 if b is None else b.tokens


def expected_partials(heads: list[Head]):
    out = []
    for hd in heads:
        keys = [b for b in hd.keys if b is not None and b.tokens]
        values = [b for b in hd.values if b is not None and b.tokens]
        out.append(attention_partial(hd.query, keys, values))
    return out


def decode_partials(raw: bytes, n_heads: int, G: int, head_dim: int):
    rec = R.partial_record_bytes(head_dim)
    res = []
    for h in range(n_heads):
        rows = []
        for g in range(G):
            r = raw[(h * G + g) * rec:(h * G + g + 1) * rec]
            m, E = np.frombuffer(r[:8], "<i4")
            L = np.frombuffer(r[8:16], "<i8")[0]
            acc = np.frombuffer(r[16:16 + 8 * head_dim], "<i8")
            rows.append((int(m), int(E), int(L), acc.copy()))
        res.append(rows)
    return res
