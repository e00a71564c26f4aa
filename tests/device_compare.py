"""Shared by the backend tests: the same host steps on two devices must give identical results."""
import numpy as np

from pmkvq_accel.host.kvcache import DeviceKVCache
from pmkvq_accel.model.cache import CacheConfig, budget_for_width


def one_layer_cache(device, max_len=1024, bits=4):
    """One layer of SmolLM2's shape (3 KV heads, head_dim 64, G=3; 1 sink, 128 window) sized for `bits`."""
    cfg = CacheConfig(3, 64, 1, 128)
    b = budget_for_width(cfg, bits, max_len)
    return DeviceKVCache(device, [cfg], [b], [b], max_len, group=3)


def assert_same_cache_results(device, reference, appends=(300, 1, 1, 500, 1), seed=0):
    """Random appends (prompt-sized and single tokens: window flushes and shrinks) and a query after each, on
    both devices: every attention output identical. Returns the two caches."""
    rng = np.random.default_rng(seed)
    caches = [one_layer_cache(d) for d in (device, reference)]
    for T in appends:
        k, v = rng.normal(size=(3, T, 64)), rng.normal(size=(3, T, 64))
        q = rng.normal(size=(9, 64))
        outs = []
        for kv in caches:
            kv.append(0, k, v)
            outs.append(kv.attention(0, q, 0.125))
        assert np.array_equal(outs[0], outs[1])
    return caches
