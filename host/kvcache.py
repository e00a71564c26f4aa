"""The host's KV cache manager: PM-KVQ progressive semantics on device memory, striped across the engines.

Decisions (which tokens go to the sink, the window or the body; when a window moves into the body; when a body
shrinks) come from the reference accounting in model/cache.py (Occupancy and its advance step), so the device
holds exactly what model.cache.ProgressiveStore holds. The data moves as the kernel contract says
(docs/kernel-interface.md, hw/regmap.py):

- every engine has two buffers, laid out alike in every engine: the cache [layer 0 | layer 1 | ...] in its
  first HBM pseudo-channel and the records [query records | partial records] in `regmap.record_pc` (its
  second, when it has two: the records then do not share the cache PC's bandwidth); a layer's tokens are striped across the engines in whole windows: window block k
  (the k-th window to fill) lives in engine `regmap.block_engine(k, N)` while it fills and after it joins that
  engine's body; the sink lives in engine 0 (`regmap.slices`);
- the host quantizes each new token to 16 bits and uploads only its codes and metadata, into the engine that
  holds the window being filled; moving a full window into the body (SHRINK of the window, then COPY) runs on
  that engine; halving the body width (SHRINK) runs on every engine's slice in one launch;
- a decode step is one ATTENTION launch per layer: every engine with tokens computes a partial over its slice
  for every KV head; the host merges the engines' partials (numerics.md section 8).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmkvq_accel.hw import regmap as L
from pmkvq_accel.model.attention import Partial, merge_partials, quantize_query
from pmkvq_accel.model.cache import CacheConfig, Occupancy, advance
from pmkvq_accel.model.quant import QuantizedKV, pack_metadata, quantize, unpack_codes, unpack_metadata

from .device import Device, Kernel


class ContextTooLong(ValueError):
    """More tokens than the bit-width table's max_len (the device cache is sized for max_len)."""


@dataclass
class _Layer:
    cfg: CacheConfig
    geo: L.CacheGeometry
    budgets: tuple          # (key budget, value budget) in bytes
    offs: dict              # region -> byte offset inside every engine's buffer
    occ: tuple              # (Occupancy keys, Occupancy values)
    events: tuple           # ([(tokens, bits)] keys, values): the shrink events so far
    args: dict              # the shared launch arguments that never change for this layer


class DeviceKVCache:
    """The KV cache of every layer of one sequence, in the engines' device memory, driven through `Kernel`
    launches."""

    def __init__(self, device: Device, configs, key_budgets, value_budgets, max_len: int, group: int):
        if not (len(configs) == len(key_budgets) == len(value_budgets)) or not configs:
            raise ValueError("need one cache config and one key and value budget per layer")
        if not 1 <= group <= L.MAX_GROUP:
            raise ValueError(f"{group} query heads per KV head: the kernel supports 1..{L.MAX_GROUP}")
        self.device, self.max_len, self.group = device, int(max_len), int(group)
        self.engines = N = device.engines
        heads, hd = configs[0].n_kv_heads, configs[0].head_dim
        geometries = []
        for i, (cfg, kb, vb) in enumerate(zip(configs, key_budgets, value_budgets)):
            if (cfg.n_kv_heads, cfg.head_dim) != (heads, hd):
                raise ValueError("every layer must have the same KV heads and head_dim")
            try:
                geometries.append(L.cache_geometry(cfg, kb, vb, self.max_len, N))
            except (ValueError, MemoryError) as e:  # BudgetError is a MemoryError
                raise type(e)(f"layer {i}: {e}") from None
        self.n_kv_heads, self.head_dim = heads, hd
        self.qdt, self.pdt = L.query_dtype(hd), L.partial_dtype(hd)
        self.records = L.RecordLayout.of(heads, group, hd)
        off = 0
        self.layers: list[_Layer] = []
        for cfg, kb, vb, geo in zip(configs, key_budgets, value_budgets, geometries):
            args = dict(geo.launch_args(off), **self.records.args())
            self.layers.append(_Layer(cfg, geo, (kb, vb), geo.region_offsets(off), (Occupancy(cfg), Occupancy(cfg)),
                                      ([], []), args))
            off += geo.layer_bytes
        if off > L.PC_BYTES:
            raise ValueError(f"each engine's share of the cache is {off / 2**20:.1f} MiB: more than one HBM "
                             f"pseudo-channel ({L.PC_BYTES >> 20} MiB) holds; use more engines or a shorter max_len")
        device.prepare(head_dim=hd, group=self.group)  # every input checked: now build/open the kernel
        self.kernel = Kernel(device)
        self.bufs = [device.allocate(off, bank=device.engine_pcs(e)[0]) for e in range(N)]
        self.record_bufs = [device.allocate(self.records.nbytes, bank=L.record_pc(device.engine_pcs(e)))
                            for e in range(N)]
        self.bases = {L.engine_arg(e, p): b.address for e in range(N)
                      for p, b in (("base", self.bufs[e]), ("records", self.record_bufs[e]))}

    @classmethod
    def from_table(cls, device: Device, table, n_kv_heads: int, head_dim: int, group: int) -> "DeviceKVCache":
        layers = table.layers
        return cls(device, [lb.cache_config(n_kv_heads, head_dim) for lb in layers],
                   [lb.key_budget_bytes for lb in layers], [lb.value_budget_bytes for lb in layers],
                   table.max_len, group)

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def tokens(self, layer: int = 0) -> int:
        return self.layers[layer].occ[0].tokens

    def widths(self, layer: int) -> tuple[int, int]:
        """(key body width, value body width) of a layer."""
        k, v = self.layers[layer].occ
        return k.bits, v.bits

    def events(self, layer: int) -> tuple[list, list]:
        return self.layers[layer].events

    def slices(self, layer: int) -> list[tuple[int, int, int]]:
        """(n_sink, n_body, n_window) of every engine for the layer (keys and values alike)."""
        return L.slices(self.layers[layer].occ[0], self.engines)

    def memory_bytes(self, metadata: bool) -> float:
        """KV bytes held (sink, body and window), codes only or codes plus scale/zero."""
        return sum(o.bytes(metadata) for lay in self.layers for o in lay.occ)

    def fp16_bytes(self) -> int:
        """What a float16 cache of the same tokens would take."""
        return sum(2 * o.tokens * o.cfg.n_kv_heads * o.cfg.head_dim * 2 for lay in self.layers for o in lay.occ[:1])

    @property
    def device_bytes(self) -> int:
        """Device memory reserved for the cache and its records over all engines (sized for max_len tokens)."""
        return sum(b.nbytes for b in self.bufs + self.record_bufs)

    # -- launches ------------------------------------------------------------------------------------------
    def _launch(self, layer: int, counts, **args) -> None:
        """One launch on the layer with per-engine token counts [(n_sink, n_body, n_window)] per engine."""
        regs = dict(self.layers[layer].args, **self.bases)
        for e, c in enumerate(counts):
            regs.update({L.engine_arg(e, f): n for f, n in zip(L.COUNT_FIELDS, c)})
        regs.update(args)
        self.kernel.launch(**regs)

    # -- append --------------------------------------------------------------------------------------------
    def append(self, layer: int, k, v) -> None:
        """Append tokens to a layer: k, v (n_kv_heads, T, head_dim) float (keys after RoPE)."""
        lay = self.layers[layer]
        cfg = lay.cfg
        k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
        shape = (cfg.n_kv_heads, k.shape[1] if k.ndim == 3 else -1, cfg.head_dim)
        if k.ndim != 3 or k.shape != shape or v.shape != shape:
            raise ValueError(f"keys/values must be (n_kv_heads={cfg.n_kv_heads}, T, head_dim={cfg.head_dim}), "
                             f"got {k.shape} and {v.shape}")
        T = k.shape[1]
        if lay.occ[0].tokens + T > self.max_len:
            raise ContextTooLong(f"layer {layer}: {lay.occ[0].tokens + T} tokens exceed the cache's max_len "
                                 f"{self.max_len} (the bit-width table's budgets are for at most that many)")
        if T == 0:
            return
        if not (np.isfinite(k).all() and np.isfinite(v).all()):
            raise ValueError(f"layer {layer}: keys/values contain NaN or Inf")
        q = quantize(np.stack([k, v]).reshape(-1, cfg.head_dim), 16)  # one group per token and head
        codes = q.codes.astype("<u2").reshape(2, cfg.n_kv_heads, T, cfg.head_dim)
        meta = pack_metadata(q.scale, q.zero).astype("<u4").reshape(2, cfg.n_kv_heads, T)
        pos = 0
        while pos < T:
            into_sink = lay.occ[0].sink < cfg.n_sink
            taken = [advance(lay.occ[i], T - pos, lay.budgets[i], lay.events[i],
                              on_flush=lambda i=i: self._flush(layer, i),
                              on_shrink=lambda i=i: self._shrink(layer, i)) for i in (0, 1)]
            assert taken[0] == taken[1], "keys and values advance together"
            n = taken[0]
            occ = lay.occ[0]
            if into_sink:
                engine, slot, meta_off = 0, occ.sink - n, 0
            else:
                engine = L.block_engine(occ.body // cfg.window, self.engines)
                slot, meta_off = occ.window - n, lay.geo.meta_window_off
            buf = self.bufs[engine]
            for i, kind in enumerate("kv"):
                geo = lay.geo.keys if kind == "k" else lay.geo.values
                coff = 0 if into_sink else geo.window_off
                for h in range(cfg.n_kv_heads):
                    base = lay.offs[f"{kind}_codes"] + h * geo.codes_stride + coff
                    buf.write(base + slot * cfg.head_dim * 2, codes[i, h, pos:pos + n])
                    buf.write(lay.offs[f"{kind}_meta"] + h * lay.geo.meta_stride + meta_off + 4 * slot,
                              meta[i, h, pos:pos + n])
            pos += n

    def _flush(self, layer: int, i: int) -> None:
        """Called by the accounting before the window joins the body. On the engine holding the window: SHRINK
        it in place down to the body width (16 -> 8 -> ...), then COPY it, codes and metadata, to the end of
        that engine's body."""
        lay = self.layers[layer]
        occ, hd = lay.occ[i], lay.cfg.head_dim
        geo = lay.geo.keys if i == 0 else lay.geo.values
        k = "kv"[i]
        owner = L.block_engine(occ.body // lay.cfg.window, self.engines)
        mine = L.slices(occ, self.engines)[owner][1]   # the owner's body tokens before the window joins
        if L.codes_bytes(mine + occ.window, hd, occ.bits) > geo.body_capacity:
            # cannot happen for <= max_len tokens: the capacity comes from the same accounting
            raise AssertionError(f"layer {layer}: engine {owner}'s body outgrows its {geo.body_capacity} "
                                 f"reserved bytes")
        only = [(0, 0, 0)] * self.engines
        bits = 16
        while bits > occ.bits:  # the window block, in place
            counts = list(only)
            counts[owner] = (0, occ.window, 0)
            self._launch(layer, counts, op=L.OP_SHRINK, kind=i, **{f"{k}_body_off": geo.window_off,
                         "meta_body_off": lay.geo.meta_window_off, f"{k}_bits": bits})
            bits //= 2
        counts = list(only)
        counts[owner] = (0, 0, occ.window)
        self._launch(layer, counts, op=L.OP_COPY, kind=i, **{f"{k}_bits": occ.bits,
                     f"{k}_body_off": geo.body_off + mine * hd * occ.bits // 8,
                     "meta_body_off": lay.geo.meta_body_off + 4 * mine})

    def _shrink(self, layer: int, i: int) -> None:
        """Called by the accounting after the body width halved: every engine shrinks its body slice in place,
        in one launch."""
        occ = self.layers[layer].occ[i]
        if occ.body:
            counts = [(0, body, 0) for _, body, _ in L.slices(occ, self.engines)]
            self._launch(layer, counts, op=L.OP_SHRINK, kind=i, **{"kv"[i] + "_bits": occ.bits * 2})

    # -- attention -----------------------------------------------------------------------------------------
    def attention(self, layer: int, q, softmax_scale: float) -> np.ndarray:
        """Decode attention of one layer: q (n_kv_heads * group, head_dim) float, query head j using KV head
        j // group. Returns the normalised output (n_kv_heads * group, head_dim) float64."""
        lay = self.layers[layer]
        H, G, hd = self.n_kv_heads, self.group, self.head_dim
        q = np.asarray(q, np.float64)
        if q.shape != (H * G, hd):
            raise ValueError(f"query must be ({H * G}, {hd}), got {q.shape}")
        if not np.isfinite(q).all():
            raise ValueError(f"layer {layer}: the query contains NaN or Inf")
        kocc, vocc = lay.occ
        if kocc.tokens == 0:
            raise ValueError(f"layer {layer}: attention over an empty cache")
        query = quantize_query(q, softmax_scale)
        rec = np.zeros(H * G, self.qdt)
        rec["q"], rec["exp"] = query.codes, query.exp
        counts = L.slices(kocc, self.engines)
        busy = [e for e, c in enumerate(counts) if sum(c)]
        for e in busy:
            self.record_bufs[e].write(self.records.query, rec)
        self._launch(layer, counts, op=L.OP_ATTENTION, group=G, k_bits=kocc.bits, v_bits=vocc.bits)
        parts = []
        for e in busy:  # merged in engine order: the same on every backend
            part = self.record_bufs[e].read(self.records.partial, H * G * self.pdt.itemsize).view(self.pdt)
            m, Lsum, acc, E = (part[f].astype(np.int64) for f in ("m", "L", "acc", "E"))
            # each KV head's G rows are one run; merge_partials works row by row, so E is given per row
            parts.append(Partial(m=m, L=Lsum, acc=acc, E=E[:, None]))
        return merge_partials(parts)

    # -- read back -----------------------------------------------------------------------------------------
    def blocks(self, layer: int, head: int, kind: str) -> list[QuantizedKV]:
        """The head's tokens as they sit in device memory, in token order: the sink, then the body's window
        blocks gathered from the engines in the order they filled, then the window (non-empty blocks only),
        read back and unpacked (for tests and debugging; not used while decoding)."""
        lay = self.layers[layer]
        occ = lay.occ[0 if kind == "k" else 1]
        geo = lay.geo.keys if kind == "k" else lay.geo.values
        hd, w, N = lay.cfg.head_dim, lay.cfg.window, self.engines
        cbase = lay.offs[f"{kind}_codes"] + head * geo.codes_stride
        mbase = lay.offs[f"{kind}_meta"] + head * lay.geo.meta_stride

        def read(e, coff, moff, bits, n):
            buf = self.bufs[e]
            codes = unpack_codes(buf.read(cbase + coff, L.codes_bytes(n, hd, bits)), bits, n, hd)
            scale, zero = unpack_metadata(buf.read(mbase + moff, 4 * n).view("<u4"))
            return QuantizedKV(codes, scale, zero, bits)
        out = []
        if occ.sink:
            out.append(read(0, 0, 0, 16, occ.sink))
        if occ.body:
            bodies = {e: read(e, geo.body_off, lay.geo.meta_body_off, occ.bits, body)   # each engine's once
                      for e, (_, body, _) in enumerate(L.slices(occ, N)) if body}
            parts = []
            for blk in range(occ.body // w):
                b, j = bodies[L.block_engine(blk, N)], L.block_slot(blk, N)
                parts.append(QuantizedKV(b.codes[j * w:(j + 1) * w], b.scale[j * w:(j + 1) * w],
                                         b.zero[j * w:(j + 1) * w], occ.bits))
            out.append(QuantizedKV(np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]),
                                   np.concatenate([p.zero for p in parts]), occ.bits))
        if occ.window:
            out.append(read(L.block_engine(occ.body // w, N), geo.window_off, lay.geo.meta_window_off, 16,
                            occ.window))
        return out
