"""Hugging Face transformers (Llama/Qwen2 family) integration: every decode-step attention goes to the device.

- `DeviceCache` is a transformers Cache whose layers hand each new token's keys (after RoPE) and values to the
  DeviceKVCache (quantized, uploaded) and keep no float copy.
- The attention function registered as "pmkvq" sends a decode step (one query token) to the device and returns
  its result; the prefill (several query tokens, empty cache) runs float SDPA on the prompt's own keys and
  values while the cache fills with exactly what the hardware holds.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pmkvq_accel.model.llm import attention_modules

from .kvcache import DeviceKVCache
from .rotation import check_rotation, rotate

ATTN_NAME = "pmkvq"


def pmkvq_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, Hq, q_len, hd); returns (B, q_len, Hq, hd) like transformers' attention functions."""
    kv: DeviceKVCache | None = getattr(module, "_pmkvq_kv", None)
    b, hq, q_len, hd = query.shape
    if kv is None or q_len > 1:
        if kv is not None and kv.tokens(module.layer_idx) > q_len:
            raise NotImplementedError("chunked prefill (several query tokens after the cache holds tokens) is not "
                                      "supported: send the prompt in one forward call")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if b != 1:
        raise ValueError(f"the accelerator decodes one sequence at a time (batch size 1), got batch {b}")
    scaling = module.scaling if scaling is None else scaling
    q = query[0, :, 0, :].detach().to("cpu", torch.float64).numpy()
    rot = getattr(kv, "rotation", "none")   # the cache holds k @ H, v @ H: send q @ H, rotate the output back
    out = rotate(kv.attention(module.layer_idx, rotate(q, rot), float(scaling)), rot, inverse=True)
    return torch.from_numpy(out).to(query.device, query.dtype).view(1, 1, hq, hd), None


AttentionInterface.register(ATTN_NAME, pmkvq_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


class DeviceCacheLayer(DynamicLayer):
    """One layer of DeviceCache: forwards new keys/values to the device cache, keeps only a token count."""

    def __init__(self, kv: DeviceKVCache, layer: int):
        super().__init__()
        self.kv, self.layer = kv, layer

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise ValueError(f"the accelerator decodes one sequence at a time (batch size 1), got "
                             f"{key_states.shape[0]}")
        rot = getattr(self.kv, "rotation", "none")   # the table's KV rotation (host/rotation.py), host side only
        self.kv.append(self.layer, rotate(key_states[0].detach().to("cpu", torch.float64).numpy(), rot),
                       rotate(value_states[0].detach().to("cpu", torch.float64).numpy(), rot))
        # Only the new tokens: a prefill attends over them in float, a decode step reads the device cache.
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.kv.tokens(self.layer)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the device KV cache cannot drop tokens")

    def reset(self) -> None:
        raise NotImplementedError("make a new DeviceKVCache for a new sequence")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("batch size 1 only")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("batch size 1 only")


class DeviceCache(Cache):
    def __init__(self, kv: DeviceKVCache):
        super().__init__(layers=[DeviceCacheLayer(kv, i) for i in range(kv.n_layers)])
        self.kv = kv


class accelerated:
    """Context manager: within it, `model`'s attention runs through `kv` (decode steps on the device).

        with accelerated(model, kv):
            model(ids, cache=DeviceCache(kv))      # or model.generate(ids, cache=...): see host/accel.py
    """

    def __init__(self, model, kv: DeviceKVCache):
        self.model, self.kv = model, kv

    def __enter__(self):
        mods = attention_modules(self.model)
        if len(mods) != self.kv.n_layers:
            raise ValueError(f"model has {len(mods)} layers, the device cache {self.kv.n_layers}")
        self._saved = self.model.config._attn_implementation
        for m in mods:
            m._pmkvq_kv = self.kv
        self.model.config._attn_implementation = ATTN_NAME
        return self

    def __exit__(self, *exc):
        for m in attention_modules(self.model):
            m.__dict__.pop("_pmkvq_kv", None)
        self.model.config._attn_implementation = self._saved
        return False


def model_geometry(model) -> tuple[int, int, int]:
    """(n_kv_heads, head_dim, group) of a Llama/Qwen2-family model."""
    c = model.config
    hq = c.num_attention_heads
    hkv = getattr(c, "num_key_value_heads", None) or hq
    hd = getattr(c, "head_dim", None) or c.hidden_size // hq
    return hkv, hd, hq // hkv


def kv_cache_for(model, table, device) -> DeviceKVCache:
    """The device cache for a table; `kv.rotation` carries the table's KV rotation to the attention hook."""
    hkv, hd, g = model_geometry(model)
    kv = DeviceKVCache.from_table(device, table, hkv, hd, g)
    kv.rotation = check_rotation(getattr(table, "rotation", "none"))
    return kv


__all__ = ["DeviceCache", "DeviceCacheLayer", "accelerated", "pmkvq_attention", "kv_cache_for", "model_geometry",
           "np"]
