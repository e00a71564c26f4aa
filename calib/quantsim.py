"""KV fake-quantisation through the golden model's quantizer, as transformers 5 cache layers.

Every KV value the attention sees goes through `pmkvq_accel.model.quant` (bf16 scale/zero, round-half-even
codes, integer shrink): the KV a method stores is dequantised and handed to ordinary float attention. The
golden integer attention datapath agrees with float attention on the same dequantised KV to ~1e-6 relative
(docs/numerics.md section 10), so float attention here stands for the hardware's.

Layers (one per decoder layer, passed as `cache=Cache(layers=[...])`):
- CaptureLayer: no quantisation; keeps the (post-RoPE) keys and values of one forward, optionally with grads.
- RTNLayer: plain per-token (per head) quantisation of every token at a fixed width.
- KIVILayer: keys per channel (groups of `group` tokens), values per token (groups of `group` channels), the
  most recent `residual` tokens kept at 16 bits; a full residual is quantised as a block when a token arrives.
- ProgressiveLayer: the PM-KVQ progressive cache (`pmkvq_accel.model.cache.ProgressiveStore`): what attention
  sees is exactly what the hardware would hold at that moment.
The stateful layers (KIVI, progressive) are exact per query token when the text is fed in chunks that start at
every flush / shrink event (see `chunk_plan`), so the whole teacher-forced evaluation is faithful to decoding.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from pmkvq_accel.model.cache import (METADATA_BYTES_PER_TOKEN_HEAD, CacheConfig, ProgressiveStore,
                                     shrink_schedule)
from pmkvq_accel.host.rotation import check_rotation, rotate
from pmkvq_accel.model.quant import QuantizedKV, dequantize, quantize, shrink_to


def fake_quant_np(a: np.ndarray, bits: int, via16: bool = False) -> np.ndarray:
    """Per-row (one row = one token of one head) golden quantise + dequantise of a 2-D float array.
    via16: quantise at 16 bits and shrink to `bits` with the integer shrink (the progressive cache's path)."""
    q = quantize(a, 16 if via16 else bits)
    if via16 and bits != 16:
        q = shrink_to(q, bits)
    return dequantize(q)


def fake_quant(x: torch.Tensor, bits: int, via16: bool = False, rotation: str = "none") -> torch.Tensor:
    """fake_quant_np over the last dimension of a tensor of any shape (rows are independent). With a rotation
    (host/rotation.py) the rows are rotated before quantisation and rotated back after dequantisation."""
    shape = x.shape
    a = x.detach().reshape(-1, shape[-1]).to(torch.float64).cpu().numpy()
    out = rotate(fake_quant_np(rotate(a, rotation), bits, via16), rotation, inverse=True)
    return torch.from_numpy(out).to(dtype=x.dtype, device=x.device).reshape(shape)


class _KVLayer(DynamicLayer):
    """Base: update() returns the full K/V attention must use; subclasses define _update.

    rotation (host/rotation.py): the layer stores rotated keys/values (k @ H, v @ H) and hands attention the
    stored K/V rotated back. That equals the device path (q @ H against the stored keys, output @ H^T) up to
    float rounding, since H is orthogonal."""

    rotates_itself = False   # True: _update rotates its input and returns the model frame itself (faster)

    def __init__(self, rotation: str = "none", **kwargs):
        super().__init__(**kwargs)
        self.rotation = check_rotation(rotation)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotation == "none" or self.rotates_itself:
            self.keys, self.values = self._update(key_states, value_states)
            return self.keys, self.values
        self.keys, self.values = self._update(rotate(key_states, self.rotation), rotate(value_states, self.rotation))
        return rotate(self.keys, self.rotation, inverse=True), rotate(self.values, self.rotation, inverse=True)

    def _update(self, k, v):
        return torch.cat([self.keys, k], dim=-2), torch.cat([self.values, v], dim=-2)

    def memory_bytes(self, metadata: bool = True) -> float:  # pragma: no cover - overridden
        raise NotImplementedError


class FloatLayer(_KVLayer):
    """No quantisation (the float reference)."""


class CaptureLayer(_KVLayer):
    """Keeps the keys/values handed to attention; with grads=True they retain their gradient."""

    def __init__(self, grads: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.grads = grads
        self.captured_k, self.captured_v = [], []

    def _update(self, k, v):
        if self.grads and k.requires_grad:
            k.retain_grad()
            v.retain_grad()
        self.captured_k.append(k)
        self.captured_v.append(v)
        return super()._update(k, v)


class RTNLayer(_KVLayer):
    """Round-to-nearest per token and head at a fixed width (no sink/window), through the golden quantizer."""

    def __init__(self, bits: int, n_kv_heads: int, head_dim: int, rotation: str = "none", **kwargs):
        super().__init__(rotation=rotation, **kwargs)
        self.bits, self.n_kv_heads, self.head_dim, self.tokens = bits, n_kv_heads, head_dim, 0

    def _update(self, k, v):
        self.tokens += k.shape[-2]
        return super()._update(fake_quant(k, self.bits), fake_quant(v, self.bits))

    def memory_bytes(self, metadata: bool = True) -> float:
        per = self.n_kv_heads * (self.head_dim * self.bits / 8 + (METADATA_BYTES_PER_TOKEN_HEAD if metadata else 0))
        return 2 * self.tokens * per


class OneTensorLayer(_KVLayer):
    """One tensor of the layer (`kind` "k" or "v") through the progressive cache's quantizer at `bits` (16-bit
    codes shrunk, per token and head, rotated first), the other left float: the probe of the KL sensitivity."""

    def __init__(self, kind: str, bits: int, rotation: str = "none", **kwargs):
        super().__init__(**kwargs)
        if kind not in ("k", "v"):
            raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
        self.kind, self.bits, self.probe_rotation = kind, bits, check_rotation(rotation)

    def _update(self, k, v):
        q = lambda x: fake_quant(x, self.bits, via16=True, rotation=self.probe_rotation)   # noqa: E731
        return super()._update(q(k) if self.kind == "k" else k, q(v) if self.kind == "v" else v)


def kivi_quant_keys(k: np.ndarray, bits: int, group: int) -> np.ndarray:
    """k (heads, T, hd), T a multiple of group: per-channel quantisation over groups of `group` tokens."""
    h, t, d = k.shape
    g = k.reshape(h, t // group, group, d).transpose(0, 1, 3, 2).reshape(-1, group)  # rows = (head, grp, chan)
    out = fake_quant_np(g, bits)
    return out.reshape(h, t // group, d, group).transpose(0, 1, 3, 2).reshape(h, t, d)


def kivi_quant_values(v: np.ndarray, bits: int, group: int) -> np.ndarray:
    """v (heads, T, hd): per-token quantisation in groups of `group` channels."""
    h, t, d = v.shape
    return fake_quant_np(v.reshape(-1, group), bits).reshape(h, t, d)


def kivi_bytes(tokens: int, n_kv_heads: int, head_dim: int, bits: int, group: int, residual: int,
               metadata: bool = True) -> float:
    """Bytes of one layer's K+V in the KIVI layout after `tokens` tokens (flush-on-arrival residual)."""
    body = 0 if tokens <= residual else ((tokens - 1) // residual) * residual
    res = tokens - body
    meta = METADATA_BYTES_PER_TOKEN_HEAD if metadata else 0
    codes = body * head_dim * bits / 8
    k_meta = (body // group) * head_dim * meta          # one scale/zero per channel per token group
    v_meta = body * (head_dim // group) * meta          # one scale/zero per channel group per token
    res_b = res * (head_dim * 2 + meta)                 # 16-bit codes + per-token scale/zero
    return n_kv_heads * (2 * codes + k_meta + v_meta + 2 * res_b)


class KIVILayer(_KVLayer):
    """KIVI-style: K per channel, V per token, a 16-bit residual of the `residual` most recent tokens."""

    def __init__(self, bits: int, group: int = 32, residual: int = 128, **kwargs):
        super().__init__(**kwargs)
        if residual % group:
            raise ValueError("the residual length must be a multiple of the group size")
        self.bits, self.group, self.residual = bits, group, residual
        self._kq = self._vq = None      # dequantised body (heads, T, hd) float64
        self._kr = self._vr = None      # raw residual tokens
        self.tokens = 0
        self.n_kv_heads = self.head_dim = None

    def _update(self, k, v):
        dev, dt = k.device, k.dtype
        kn = k.detach()[0].double().cpu().numpy()
        vn = v.detach()[0].double().cpu().numpy()
        self.n_kv_heads, self.head_dim = kn.shape[0], kn.shape[2]
        self.tokens += kn.shape[1]
        self._kr = kn if self._kr is None else np.concatenate([self._kr, kn], axis=1)
        self._vr = vn if self._vr is None else np.concatenate([self._vr, vn], axis=1)
        while self._kr.shape[1] > self.residual:      # a token arrived while the residual was full
            kb = kivi_quant_keys(self._kr[:, :self.residual], self.bits, self.group)
            vb = kivi_quant_values(self._vr[:, :self.residual], self.bits, self.group)
            self._kq = kb if self._kq is None else np.concatenate([self._kq, kb], axis=1)
            self._vq = vb if self._vq is None else np.concatenate([self._vq, vb], axis=1)
            self._kr, self._vr = self._kr[:, self.residual:], self._vr[:, self.residual:]
        kr = fake_quant_np(self._kr.reshape(-1, self.head_dim), 16).reshape(self._kr.shape)
        vr = fake_quant_np(self._vr.reshape(-1, self.head_dim), 16).reshape(self._vr.shape)
        kf = kr if self._kq is None else np.concatenate([self._kq, kr], axis=1)
        vf = vr if self._vq is None else np.concatenate([self._vq, vr], axis=1)
        return (torch.from_numpy(kf)[None].to(dtype=dt, device=dev),
                torch.from_numpy(vf)[None].to(dtype=dt, device=dev))

    def memory_bytes(self, metadata: bool = True) -> float:
        return kivi_bytes(self.tokens, self.n_kv_heads, self.head_dim, self.bits, self.group, self.residual,
                          metadata)

    def flush_points(self, length: int) -> list[int]:
        return list(range(self.residual, length, self.residual))


class _DequantMirror:
    """Dequantised copy of one ProgressiveStore head, updated incrementally (the body only grows at a flush
    and is recomputed when it shrinks). With a rotation the copy is kept rotated back (the model's frame): the
    rotation acts on each token alone, so the incremental update stays exact."""

    def __init__(self, rotation: str = "none"):
        self.body_bits, self.body_n, self.body = None, 0, None
        self.sink = None
        self.rotation = rotation

    def _deq(self, block):
        return rotate(dequantize(block), self.rotation, inverse=True)

    def view(self, store: ProgressiveStore, head: int) -> np.ndarray:
        occ = store.occ
        blocks = store.blocks(head)
        i = 0
        parts = []
        if occ.sink:
            if self.sink is None or self.sink.shape[0] != occ.sink:
                self.sink = self._deq(blocks[i])
            parts.append(self.sink)
            i += 1
        if occ.body:
            b = blocks[i]
            i += 1
            if self.body is None or b.bits != self.body_bits or b.tokens < self.body_n:
                self.body = self._deq(b)
            elif b.tokens > self.body_n:
                tail = QuantizedKV(b.codes[self.body_n:], b.scale[self.body_n:], b.zero[self.body_n:], b.bits)
                self.body = np.concatenate([self.body, self._deq(tail)])
            self.body_bits, self.body_n = b.bits, b.tokens
            parts.append(self.body)
        if occ.window:
            parts.append(self._deq(blocks[i]))
        return np.concatenate(parts)


class ProgressiveLayer(_KVLayer):
    """The PM-KVQ progressive cache of one layer: keys and values each a ProgressiveStore with its budget.
    With a rotation the stores hold rotated K/V (what the device holds); attention gets them rotated back."""

    rotates_itself = True

    def __init__(self, key_cfg: CacheConfig, key_budget: float, value_cfg: CacheConfig, value_budget: float,
                 rotation: str = "none", **kwargs):
        super().__init__(rotation=rotation, **kwargs)
        self.kstore = ProgressiveStore(key_cfg, key_budget)
        self.vstore = ProgressiveStore(value_cfg, value_budget)
        self._km = [_DequantMirror(self.rotation) for _ in range(key_cfg.n_kv_heads)]
        self._vm = [_DequantMirror(self.rotation) for _ in range(value_cfg.n_kv_heads)]
        self.peak_bytes = {True: 0.0, False: 0.0}

    def _update(self, k, v):
        dev, dt = k.device, k.dtype
        self.kstore.append(rotate(k.detach()[0].double().cpu().numpy(), self.rotation))
        self.vstore.append(rotate(v.detach()[0].double().cpu().numpy(), self.rotation))
        for m in (True, False):
            self.peak_bytes[m] = max(self.peak_bytes[m], self.memory_bytes(m))
        kf = np.stack([mir.view(self.kstore, h) for h, mir in enumerate(self._km)])
        vf = np.stack([mir.view(self.vstore, h) for h, mir in enumerate(self._vm)])
        npdt = torch.empty((), dtype=dt).numpy().dtype   # cast in NumPy (same rounding as torch's .to)
        return (torch.from_numpy(kf.astype(npdt))[None].to(device=dev),
                torch.from_numpy(vf.astype(npdt))[None].to(device=dev))

    def memory_bytes(self, metadata: bool = True) -> float:
        return self.kstore.memory_bytes(metadata) + self.vstore.memory_bytes(metadata)

    def flush_points(self, length: int) -> list[int]:
        pts = set()
        for st in (self.kstore, self.vstore):
            c = st.cfg
            pts.update(range(c.n_sink + c.window, length, c.window))
            pts.update(at - 1 for at, _ in shrink_schedule(c, st.budget, length))
        return sorted(p for p in pts if 0 < p < length)


def make_cache(layers) -> Cache:
    return Cache(layers=list(layers))


def chunk_plan(length: int, layers, max_chunk: int = 512) -> list[tuple[int, int]]:
    """Chunks [a, b) of the token stream such that no layer's stored state changes inside a chunk except by
    appending the chunk's own tokens to its 16-bit window/residual: every flush and shrink happens at a
    chunk's first token, so each query sees exactly the cache state of token-by-token decoding."""
    pts = {0, length}
    for layer in layers:
        if hasattr(layer, "flush_points"):
            pts.update(layer.flush_points(length))
    pts = sorted(pts)
    out = []
    for a, b in zip(pts[:-1], pts[1:]):
        while b - a > max_chunk:
            out.append((a, a + max_chunk))
            a += max_chunk
        out.append((a, b))
    return out
