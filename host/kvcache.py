"""The host's KV cache manager: PM-KVQ progressive semantics on device memory.

Decisions (which tokens go to the sink, the window or the body; when a window moves into the body; when a body
shrinks) come from the reference accounting in model/cache.py (Occupancy and its advance step), so the device
holds exactly what model.cache.ProgressiveStore holds. The data moves as the kernel contract says
(docs/kernel-interface.md): the host quantizes each new token to 16 bits and uploads only its codes and metadata;
moving a full window into the body (SHRINK of the window, then COPY) and halving the body width (SHRINK) run
on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmkvq_accel.model.attention import Partial, merge_partials, quantize_query
from pmkvq_accel.model.cache import CacheConfig, Occupancy, advance
from pmkvq_accel.model.quant import QuantizedKV, pack_metadata, quantize, unpack_codes, unpack_metadata

from . import layout as L
from .device import Device, Kernel


class ContextTooLong(ValueError):
    """More tokens than the bit-width table's max_len (the device cache is sized for max_len)."""


@dataclass
class _Layer:
    cfg: CacheConfig
    geo: L.CacheGeometry
    budgets: tuple          # (key budget, value budget) in bytes
    buf: object             # DeviceBuffer holding the layer's four regions
    offs: dict              # region -> byte offset inside buf
    occ: tuple              # (Occupancy keys, Occupancy values)
    events: tuple           # ([(tokens, bits)] keys, values): the shrink events so far
    args: dict              # the launch arguments that never change for this layer


class DeviceKVCache:
    """The KV cache of every layer of one sequence, in device memory, driven through `Kernel` launches."""

    def __init__(self, device: Device, configs, key_budgets, value_budgets, max_len: int, group: int):
        if not (len(configs) == len(key_budgets) == len(value_budgets)) or not configs:
            raise ValueError("need one cache config and one key and value budget per layer")
        if not 1 <= group <= L.MAX_GROUP:
            raise ValueError(f"{group} query heads per KV head: the kernel supports 1..{L.MAX_GROUP}")
        self.device, self.kernel, self.max_len, self.group = device, Kernel(device), int(max_len), int(group)
        self.layers: list[_Layer] = []
        heads, hd = configs[0].n_kv_heads, configs[0].head_dim
        geometries = []
        for i, (cfg, kb, vb) in enumerate(zip(configs, key_budgets, value_budgets)):
            if (cfg.n_kv_heads, cfg.head_dim) != (heads, hd):
                raise ValueError("every layer must have the same KV heads and head_dim")
            try:
                geometries.append(L.cache_geometry(cfg, kb, vb, self.max_len))
            except (ValueError, MemoryError) as e:  # BudgetError is a MemoryError
                raise type(e)(f"layer {i}: {e}") from None
        device.prepare(head_dim=hd, group=self.group)  # every input checked: now build/open the kernel
        for i, (cfg, kb, vb, geo) in enumerate(zip(configs, key_budgets, value_budgets, geometries)):
            h = cfg.n_kv_heads
            sizes = {"k_codes": h * geo.keys.codes_stride, "v_codes": h * geo.values.codes_stride,
                     "k_meta": h * geo.meta_stride, "v_meta": h * geo.meta_stride}
            offs, total = {}, 0
            for name, size in sizes.items():
                offs[name], total = total, total + size
            buf = device.allocate(total, bank=i)
            args = dict(n_heads=h, head_dim=hd, meta_stride=geo.meta_stride,
                        k_codes=buf.address + offs["k_codes"], v_codes=buf.address + offs["v_codes"],
                        k_meta=buf.address + offs["k_meta"], v_meta=buf.address + offs["v_meta"],
                        k_window_off=geo.keys.window_off, k_body_off=geo.keys.body_off,
                        v_window_off=geo.values.window_off, v_body_off=geo.values.body_off,
                        k_codes_stride=geo.keys.codes_stride, v_codes_stride=geo.values.codes_stride,
                        meta_window_off=geo.meta_window_off, meta_body_off=geo.meta_body_off)
            self.layers.append(_Layer(cfg, geo, (kb, vb), buf, offs, (Occupancy(cfg), Occupancy(cfg)),
                                      ([], []), args))
        self.n_kv_heads, self.head_dim = heads, hd
        self.qdt, self.pdt = L.query_dtype(hd), L.partial_dtype(hd)
        self.query_buf = device.allocate(heads * group * self.qdt.itemsize, bank=0)
        self.partial_buf = device.allocate(heads * group * self.pdt.itemsize, bank=0)

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

    def memory_bytes(self, metadata: bool) -> float:
        """KV bytes held (sink, body and window), codes only or codes plus scale/zero."""
        return sum(o.bytes(metadata) for lay in self.layers for o in lay.occ)

    def fp16_bytes(self) -> int:
        """What a float16 cache of the same tokens would take."""
        return sum(2 * o.tokens * o.cfg.n_kv_heads * o.cfg.head_dim * 2 for lay in self.layers for o in lay.occ[:1])

    @property
    def device_bytes(self) -> int:
        """Device memory reserved for the cache (sized for max_len tokens)."""
        return sum(lay.buf.nbytes for lay in self.layers)

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
            for i, kind in enumerate("kv"):
                geo = lay.geo.keys if kind == "k" else lay.geo.values
                if into_sink:
                    slot, code_off, meta_off = occ.sink - n, 0, 0
                else:
                    slot, code_off, meta_off = occ.window - n, geo.window_off, lay.geo.meta_window_off
                for h in range(cfg.n_kv_heads):
                    base = lay.offs[f"{kind}_codes"] + h * geo.codes_stride + code_off
                    lay.buf.write(base + slot * cfg.head_dim * 2, codes[i, h, pos:pos + n])
                    lay.buf.write(lay.offs[f"{kind}_meta"] + h * lay.geo.meta_stride + meta_off + 4 * slot,
                                  meta[i, h, pos:pos + n])
            pos += n

    def _kind_args(self, layer: int, i: int) -> dict:
        occ = self.layers[layer].occ[i]
        return dict(self.layers[layer].args, kind=i, n_sink=occ.sink, n_body=occ.body, n_window=occ.window)

    def _flush(self, layer: int, i: int) -> None:
        """Called by the accounting before the window joins the body. On the device: SHRINK the window in place
        down to the body width (16 -> 8 -> ...), then COPY it, codes and metadata, to the end of the body."""
        lay = self.layers[layer]
        occ, hd = lay.occ[i], lay.cfg.head_dim
        geo = lay.geo.keys if i == 0 else lay.geo.values
        k = "kv"[i]
        if L.codes_bytes(occ.body + occ.window, hd, occ.bits) > geo.body_capacity:
            # cannot happen for <= max_len tokens: the capacity comes from the same accounting
            raise AssertionError(f"layer {layer}: the body outgrows its {geo.body_capacity} reserved bytes")
        args = self._kind_args(layer, i)
        bits = 16
        while bits > occ.bits:  # the window block, in place
            self.kernel.launch(**{**args, "op": L.OP_SHRINK, f"{k}_body_off": geo.window_off,
                                  "meta_body_off": lay.geo.meta_window_off, "n_body": occ.window, f"{k}_bits": bits})
            bits //= 2
        self.kernel.launch(**{**args, "op": L.OP_COPY, f"{k}_bits": occ.bits,
                              f"{k}_body_off": geo.body_off + occ.body * hd * occ.bits // 8,
                              "meta_body_off": lay.geo.meta_body_off + 4 * occ.body})

    def _shrink(self, layer: int, i: int) -> None:
        """Called by the accounting after the body width halved: the device shrinks the body in place."""
        occ = self.layers[layer].occ[i]
        if occ.body:
            self.kernel.launch(op=L.OP_SHRINK, **self._kind_args(layer, i), **{"kv"[i] + "_bits": occ.bits * 2})

    # -- attention -----------------------------------------------------------------------------------------
    def attention(self, layer: int, q, softmax_scale: float) -> np.ndarray:
        """Decode attention of one layer: q (n_kv_heads * group, head_dim) float, query head j using KV head
        j // group. Returns the normalised output (n_kv_heads * group, head_dim) float64."""
        lay = self.layers[layer]
        H, G, hd = self.n_kv_heads, self.group, self.head_dim
        q = np.asarray(q, np.float64)
        if q.shape != (H * G, hd):
            raise ValueError(f"query must be ({H * G}, {hd}), got {q.shape}")
        kocc, vocc = lay.occ
        if kocc.tokens == 0:
            raise ValueError(f"layer {layer}: attention over an empty cache")
        query = quantize_query(q, softmax_scale)
        rec = np.zeros(H * G, self.qdt)
        rec["q"], rec["exp"] = query.codes, query.exp
        self.query_buf.write(0, rec)
        self.kernel.launch(op=L.OP_ATTENTION, group=G, n_sink=kocc.sink, n_body=kocc.body, n_window=kocc.window,
                           k_bits=kocc.bits, v_bits=vocc.bits, query=self.query_buf.address,
                           partial=self.partial_buf.address, **lay.args)
        part = self.partial_buf.read(0, H * G * self.pdt.itemsize).view(self.pdt)
        m, Lsum, acc, E = (part[f].astype(np.int64) for f in ("m", "L", "acc", "E"))
        # Each KV head's G rows are one single-run result; merge_partials normalises row by row, so all
        # heads go through it at once with E given per row.
        return merge_partials([Partial(m=m, L=Lsum, acc=acc, E=E[:, None])])

    # -- read back -----------------------------------------------------------------------------------------
    def blocks(self, layer: int, head: int, kind: str) -> list[QuantizedKV]:
        """The head's tokens as they sit in device memory: [sink, body, window] blocks (non-empty ones),
        read back and unpacked (for tests and debugging; not used while decoding)."""
        lay = self.layers[layer]
        occ = lay.occ[0 if kind == "k" else 1]
        geo = lay.geo.keys if kind == "k" else lay.geo.values
        hd = lay.cfg.head_dim
        cbase = lay.offs[f"{kind}_codes"] + head * geo.codes_stride
        mbase = lay.offs[f"{kind}_meta"] + head * lay.geo.meta_stride
        out = []
        for coff, moff, bits, n in ((0, 0, 16, occ.sink), (geo.body_off, lay.geo.meta_body_off, occ.bits, occ.body),
                                    (geo.window_off, lay.geo.meta_window_off, 16, occ.window)):
            if n:
                codes = unpack_codes(lay.buf.read(cbase + coff, L.codes_bytes(n, hd, bits)), bits, n, hd)
                scale, zero = unpack_metadata(lay.buf.read(mbase + moff, 4 * n).view("<u4"))
                out.append(QuantizedKV(codes, scale, zero, bits))
        return out
