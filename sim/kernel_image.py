"""Device-memory images for the kernel testbenches, built with the host's contract code (hw/regmap.py: the
per-engine geometry, the record formats, the register names): every engine's buffer laid out as the host
lays it out: its cache buffer (one layer, with the engine's own sink/body/window blocks per KV head) and its
records buffer (`regmap.RecordLayout`: query records | partial records), the launch registers, and the
expected partial records of every engine."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmkvq_accel.hw import regmap as R
from pmkvq_accel.model.attention import Query, attention_partial
from pmkvq_accel.model.cache import CacheConfig
from pmkvq_accel.model.quant import QuantizedKV, pack_codes, pack_metadata

BASE = 0x10000        # engine 0's buffers; engine e's at BASE + e * span (span: both buffers, rounded to 64 KiB)


def meta_bytes(block: QuantizedKV | None) -> bytes:
    if block is None or block.tokens == 0:
        return b""
    return pack_metadata(block.scale, block.zero).astype("<u4").tobytes()


def code_bytes(block: QuantizedKV | None) -> bytes:
    if block is None or block.tokens == 0:
        return b""
    return pack_codes(block.codes, block.bits, R.WORD_BITS).tobytes()


def _tokens(b):
    return 0 if b is None else b.tokens


@dataclass
class Head:
    """One KV head's slice in one engine: (sink, body, window) blocks for keys and values (None = empty),
    and the head's G-head query (the same in every engine)."""
    keys: tuple
    values: tuple
    query: Query


@dataclass
class Image:
    mem: dict             # address -> bytes
    args: dict            # every register of the launch (shared and per engine)
    bases: list           # engine cache-buffer addresses
    buffer_bytes: int     # bytes of one engine's cache buffer
    records: list         # engine records-buffer addresses
    record_layout: R.RecordLayout
    geo: R.CacheGeometry

    def buffers(self, e: int) -> list[tuple[int, int]]:
        """Engine e's buffers: [(address, bytes)] of its cache and its records."""
        return [(self.bases[e], self.buffer_bytes), (self.records[e], self.record_layout.nbytes)]

    def engine_mem(self, e: int) -> dict:
        """The part of the image in engine e's buffers."""
        return {a: d for a, d in self.mem.items() if any(lo <= a < lo + n for lo, n in self.buffers(e))}

    def offset(self, name: str, h: int = 0) -> int:
        """Offset in an engine's buffer of head h's region `name` (k_codes, v_codes, k_meta, v_meta)."""
        stride = {"k_codes": self.geo.keys.codes_stride, "v_codes": self.geo.values.codes_stride}.get(
            name, self.geo.meta_stride)
        return self.args[name] + h * stride


def build_image(engines: list[list[Head]], sink_cap: int = 1, window_cap: int = 128, body_cap: int = 2048) -> Image:
    """Lay out every engine's heads as the contract says. engines[e] lists engine e's KV heads (the same
    number in each engine; an engine's blocks may all be empty)."""
    n = len(engines[0])
    if any(len(hs) != n for hs in engines):
        raise ValueError("every engine covers the same KV heads")
    first = engines[0][0]
    G, hd = first.query.codes.shape
    cfg = CacheConfig(n_kv_heads=n, head_dim=hd, n_sink=sink_cap, window=window_cap)
    geo = R.fixed_geometry(cfg, body_cap, len(engines))
    recs = R.RecordLayout.of(n, G, hd)
    size = geo.layer_bytes
    # the records buffer first, then the cache buffer 4 KiB aligned: for one shape both addresses stay put
    # whatever the token counts (the benches replace regions launch after launch at the same addresses)
    cache_off = -(-recs.nbytes // 0x1000) * 0x1000
    span = -(-(cache_off + size) // 0x10000) * 0x10000
    records = [BASE + e * span for e in range(len(engines))]
    bases = [r + cache_off for r in records]
    args = dict(geo.launch_args(0), **recs.args(), op=R.OP_ATTENTION, kind=0, group=G)
    mem = {}
    rec = np.zeros(n * G, R.query_dtype(hd))
    for h, head in enumerate(engines[0]):
        rec["q"][h * G:(h + 1) * G], rec["exp"][h * G:(h + 1) * G] = head.query.codes, head.query.exp
    widths = {}
    for e, heads in enumerate(engines):
        base = bases[e]
        mem[records[e] + recs.query] = rec.tobytes()
        counts = [_tokens(b) for b in heads[0].keys]
        for h, head in enumerate(heads):
            for kind, blocks, stride in (("k", head.keys, geo.keys.codes_stride),
                                         ("v", head.values, geo.values.codes_stride)):
                if [_tokens(b) for b in blocks] != counts:
                    raise ValueError("every head of an engine (keys and values) has the same slice")
                sink, body, window = blocks
                cb = base + args[f"{kind}_codes"] + h * stride
                mb = base + args[f"{kind}_meta"] + h * geo.meta_stride
                mem[cb] = code_bytes(sink)
                mem[cb + geo.keys.body_off] = code_bytes(body)
                mem[cb + geo.keys.window_off] = code_bytes(window)
                mem[mb] = meta_bytes(sink)
                mem[mb + geo.meta_body_off] = meta_bytes(body)
                mem[mb + geo.meta_window_off] = meta_bytes(window)
                if body is not None:
                    widths[kind] = body.bits
        args.update({R.engine_arg(e, f): c for f, c in zip(R.COUNT_FIELDS, counts)})
        args[R.engine_arg(e, "base")] = base
        args[R.engine_arg(e, "records")] = records[e]
    args.update(k_bits=widths.get("k", 16), v_bits=widths.get("v", 16))
    return Image(mem, args, bases, size, records, recs, geo)


def expected_partials(heads: list[Head]):
    """attention_partial of every head of one engine's slice (None for an engine with no tokens)."""
    out = []
    for hd in heads:
        keys = [b for b in hd.keys if b is not None and b.tokens]
        values = [b for b in hd.values if b is not None and b.tokens]
        out.append(attention_partial(hd.query, keys, values) if keys else None)
    return out


def decode_partials(raw: bytes, n_heads: int, G: int, head_dim: int):
    """[(m, E, L, acc)] per head and query head, from an engine's partial records."""
    recs = np.frombuffer(raw, R.partial_dtype(head_dim), n_heads * G)
    return [[(int(r["m"]), int(r["E"]), int(r["L"]), r["acc"].copy()) for r in recs[h * G:(h + 1) * G]]
            for h in range(n_heads)]
