"""The progressive cache reference: placement, shrink schedule, budget accounting and errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pmkvq_accel.model.cache import (BudgetError, CacheConfig, LayerKVCache, ProgressiveStore, budget_for_width,
                                     shrink_schedule)
from pmkvq_accel.model.quant import quantize, shrink_to

CFG = CacheConfig(n_kv_heads=2, head_dim=8, n_sink=1, window=16)


def feed(store, x, chunks):
    pos = 0
    for n in chunks:
        store.append(x[:, pos:pos + n])
        pos += n
    assert pos == x.shape[1]


def check_contents(store, x):
    """Every token present, in order, each block's codes equal to the integer-shrunk 16-bit codes."""
    for h in range(store.cfg.n_kv_heads):
        blocks = store.blocks(h)
        assert sum(b.tokens for b in blocks) == x.shape[1]
        pos = 0
        for b in blocks:
            ref = shrink_to(quantize(x[h, pos:pos + b.tokens], 16), b.bits)
            np.testing.assert_array_equal(b.codes, ref.codes)
            np.testing.assert_array_equal(b.scale, ref.scale)
            np.testing.assert_array_equal(b.zero, ref.zero)
            pos += b.tokens


def test_layout_and_schedule_match_the_accounting():
    T = 400
    budget = budget_for_width(CFG, 2, T)
    x = np.random.default_rng(0).normal(size=(2, T, 8))
    store = ProgressiveStore(CFG, budget)
    feed(store, x, [1] * T)
    assert store.events == shrink_schedule(CFG, budget, T)
    assert [b for _, b in store.events] == [8, 4, 2]
    assert [b.bits for b in store.blocks(0)] == [16, 2, 16]
    assert store.blocks(0)[0].tokens == 1 and 1 <= store.blocks(0)[2].tokens <= 16
    assert store.memory_bytes(True) <= budget
    check_contents(store, x)
    with pytest.raises(BudgetError, match="too small"):
        store.append(x[:, :1])  # one token beyond max_len does not fit even at 2 bits


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 70), min_size=1, max_size=12), st.sampled_from([16, 8, 4, 2]),
       st.booleans())
def test_random_append_sequences_equal_token_by_token(chunks, final_bits, metadata):
    cfg = CacheConfig(n_kv_heads=2, head_dim=8, n_sink=2, window=16, count_metadata=metadata)
    T = sum(chunks)
    x = np.random.default_rng(T).normal(size=(2, T, 8)) * 3
    budget = budget_for_width(cfg, final_bits, T)
    a, b = ProgressiveStore(cfg, budget), ProgressiveStore(cfg, budget)
    feed(a, x, chunks)
    feed(b, x, [1] * T)
    assert a.events == b.events == shrink_schedule(cfg, budget, T)
    assert a.body_bits == b.body_bits >= final_bits
    check_contents(a, x)
    for h in range(2):
        np.testing.assert_array_equal(a.dequantized(h), b.dequantized(h))


def test_memory_accounting_both_ways():
    cfg = CacheConfig(n_kv_heads=3, head_dim=64)
    assert cfg.token_bytes(2, metadata=False) == 3 * 64 * 2 / 8
    assert cfg.token_bytes(2, metadata=True) == 3 * 64 * 2 / 8 + 3 * 4
    store = ProgressiveStore(cfg, 1e9)
    store.append(np.zeros((3, 300, 64)))
    # 300 tokens: 1 sink + 256 body (two window flushes, still 16 bits under a huge budget) + 43 window
    assert [b.tokens for b in store.blocks(0)] == [1, 256, 43]
    assert store.memory_bytes(False) == 300 * 3 * 64 * 2
    assert store.memory_bytes(True) == 300 * (3 * 64 * 2 + 12)


def test_budget_too_small_and_bad_arguments():
    with pytest.raises(BudgetError, match="too small"):
        shrink_schedule(CFG, budget_for_width(CFG, 2, 100) - 1, 100)
    tiny = ProgressiveStore(CFG, 10.0)
    with pytest.raises(BudgetError, match="too small"):
        tiny.append(np.zeros((2, 1, 8)))
    with pytest.raises(ValueError, match="budget"):
        ProgressiveStore(CFG, float("nan"))
    with pytest.raises(ValueError, match="n_kv_heads"):
        ProgressiveStore(CFG, 1e6).append(np.zeros((3, 1, 8)))
    with pytest.raises(ValueError, match="unsupported"):
        CacheConfig(2, 8, body_init_bits=3)
    with pytest.raises(ValueError, match="unsupported"):
        budget_for_width(CFG, 5, 10)


def test_layer_cache_keys_and_values_have_their_own_budgets():
    T = 300
    layer = LayerKVCache(CFG, budget_for_width(CFG, 4, T), budget_for_width(CFG, 2, T))
    rng = np.random.default_rng(1)
    layer.append(rng.normal(size=(2, T, 8)), rng.normal(size=(2, T, 8)))
    assert (layer.keys.body_bits, layer.values.body_bits) == (4, 2)
    assert layer.memory_bytes(True) == layer.keys.memory_bytes(True) + layer.values.memory_bytes(True)
