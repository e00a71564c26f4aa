"""Calibration pieces on a tiny random Llama: positions, factors, sensitivity pairing, MILP, faithful chunking."""
import itertools

import numpy as np
import pytest
import torch

from pmkvq_accel.calib import calibrate as C
from pmkvq_accel.calib.allocate import AllocationError, allocate, rtn_equivalent_bytes, uniform_budgets
from pmkvq_accel.calib.quantsim import (FloatLayer, KIVILayer, ProgressiveLayer, RTNLayer, chunk_plan, kivi_bytes,
                                        make_cache)
from pmkvq_accel.model.cache import CacheConfig, budget_for_width

from test_calib_table import tiny_llama


def test_positional_interpolation():
    p = C.positions(2048, 8192, True)
    assert p.numel() == 2048 and p[0] == 0 and p[1] == 4 and p[-1] == 8188
    assert torch.equal(C.positions(16, 64, False), torch.arange(16))
    with pytest.raises(ValueError):
        C.positions(64, 32, True)


def test_factors_shared_on_rope_pairs():
    m = torch.rand(2, 16) * 10
    r = C.factors_for(m, 0.5)
    assert torch.equal(r[:, :8], r[:, 8:])
    assert torch.allclose(r[:, :8], torch.maximum(m[:, :8], m[:, 8:]).sqrt(), rtol=1e-5)
    assert torch.all(C.factors_for(m, 0.0) == 1)


def _forward_sample(model, T=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (T,), generator=g)


def test_sensitivity_pairs_each_layer_with_its_own_gradient():
    model = tiny_llama(num_hidden_layers=4)
    with torch.no_grad():   # layer 1's attention output is cut: dL/dV of layer 1 is exactly zero
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    ids = [_forward_sample(model)]
    sk, sv = C.sensitivity(model, ids, torch.arange(48), [8, 4, 2])
    assert sk.shape == (4, 3) and sv.shape == (4, 3)
    assert np.all(sv[1] == 0) and np.all(sk[1] == 0)
    assert np.all(sv[[0, 2, 3]] > 0)
    assert np.all(sk[:, 2] >= sk[:, 0])  # 2-bit errors exceed 8-bit errors
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_fisher_sensitivity_is_the_mean_squared_error_product_on_one_scale():
    model = tiny_llama(num_hidden_layers=3)
    ids = [_forward_sample(model)]
    ka, va = C.sensitivity(model, ids, torch.arange(48), [8, 4, 2])
    kf, vf = C.sensitivity(model, ids, torch.arange(48), [8, 4, 2], metric="fisher")
    assert max(kf.max(), vf.max()) == 1.0 and np.all(kf > 0) and np.all(vf > 0)   # scaled by one constant
    assert np.all(kf[:, 2] >= kf[:, 0]) and not np.allclose(kf / kf.max(), ka / ka.max())
    with pytest.raises(ValueError, match="unknown sensitivity metric"):
        C.sensitivity(model, ids, torch.arange(48), [4, 2], metric="l1")
    s = C.CalibSettings()
    assert s.key("m") != C.CalibSettings(sensitivity="fisher").key("m")


def test_kl_sensitivity_measures_each_tensor_alone_end_to_end():
    model = tiny_llama(num_hidden_layers=3)
    with torch.no_grad():   # layer 1's attention output is cut: its keys and values change nothing downstream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    ids = [_forward_sample(model)]
    sk, sv = C.kl_sensitivity(model, ids, torch.arange(48), [4, 2])
    assert sk.shape == (3, 2) and sv.shape == (3, 2)
    assert np.all(sk[1] < 1e-9) and np.all(sv[1] < 1e-9)
    assert np.all(sk[[0, 2], 1] > 0) and np.all(sv[[0, 2]] > 0)
    assert np.all(sv[[0, 2], 1] > sv[[0, 2], 0])      # 2-bit values cost more than 4-bit ones
    with torch.no_grad():   # the replayed float prefix gives exactly the probe computed in full
        pos = torch.arange(48)
        ref = torch.log_softmax(C._forward(model, ids[0], pos, [C.FloatLayer() for _ in range(3)])[0].float(), -1)
        lp = torch.log_softmax(C._forward(model, ids[0], pos, [C.FloatLayer(), C.FloatLayer(),
                                                                C.OneTensorLayer("v", 2)])[0].float(), -1)
    assert sv[2, 1] == max(float((ref.exp() * (ref - lp)).sum(-1).mean()), 0.0)
    assert all("forward" not in vars(b) for b in model.model.layers)    # the replay is undone
    with pytest.raises(ValueError, match="kind"):
        C.OneTensorLayer("q", 4)   # the layer class calibrate imports


def test_alpha_search_returns_grid_values_and_zero_is_allowed():
    model = tiny_llama()
    s = C.CalibSettings(n_samples=1, seq_len=48, search_queries=16)
    max_k, qkv, _ = C.collect_stats(model, [_forward_sample(model)], torch.arange(48), s)
    alphas, mses = C.search_alpha(max_k, qkv, s, n_heads=4)
    assert len(alphas) == 3 and all(a in C.ALPHA_GRID for a in alphas)
    assert 0.0 in C.ALPHA_GRID and len(mses[0]) == 21


def test_mass_profile_is_the_models_own_attention_averaged_over_layers_and_heads():
    """collect_stats' profile against the attention probabilities transformers computes (eager attention), at
    non-trivial positions (the positional interpolation's stride)."""
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    s = C.CalibSettings(n_samples=2, seq_len=48, search_samples=2)
    samples = [_forward_sample(model, seed=i) for i in range(2)]
    pos = torch.arange(0, 96, 2)
    _, _, mass = C.collect_stats(model, samples, pos, s)
    with torch.no_grad():
        att = [torch.stack(model(input_ids=x[None], position_ids=pos[None], output_attentions=True).attentions)
               for x in samples]
    p = torch.stack(att).mean(dim=(0, 1, 2, 3)).double().numpy()      # (T, T): samples, layers, batch, heads
    assert mass["recent"].shape == (48, C.MASS_RECENT) and mass["first"].shape == (48, C.MASS_FIRST)
    t, d = 30, 7
    assert np.isclose(mass["recent"][t, d], p[t, t - d], atol=1e-5)
    assert np.isclose(mass["recent"][3, 0], p[3, 3], atol=1e-5) and mass["recent"][3, 5] == 0
    assert np.allclose(mass["first"][:, 2], p[:, 2], atol=1e-5)
    assert np.allclose(mass["recent"][:, :48].sum(1), 1.0, atol=1e-5)   # all of a causal row at T <= 128


def brute(sk, sv, widths, cfg, max_len, budget, separate):
    best = None
    n = sk.shape[0]
    mem = [budget_for_width(cfg, w, max_len) for w in widths]
    groups = n * (2 if separate else 1)
    for choice in itertools.product(range(len(widths)), repeat=groups):
        kc = choice[:n]
        vc = choice[n:] if separate else kc
        m = sum(mem[j] for j in kc) + sum(mem[j] for j in vc)
        if m > budget:
            continue
        cost = sum(sk[i, kc[i]] + sv[i, vc[i]] for i in range(n))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, [widths[j] for j in kc], [widths[j] for j in vc])
    return best


@pytest.mark.parametrize("separate", [False, True])
def test_milp_matches_brute_force(separate):
    rng = np.random.default_rng(0)
    widths = [8, 4, 2]
    cfg = CacheConfig(2, 16, 1, 8)
    n = 3
    sk = rng.random((n, 3)) * [[0.01, 0.1, 1.0]]
    sv = rng.random((n, 3)) * [[0.01, 0.1, 1.0]]
    budget = 0.5 * (2 * n * budget_for_width(cfg, 8, 256) + 2 * n * budget_for_width(cfg, 2, 256))
    a = allocate(sk, sv, widths, cfg, 256, budget, separate)
    cost, kb, vb = brute(sk, sv, widths, cfg, 256, budget, separate)
    assert a.objective == pytest.approx(cost, rel=1e-6)
    assert a.used_bytes <= budget
    if not separate:
        assert a.key_bits == a.value_bits


def test_milp_infeasible_and_bad_inputs():
    cfg = CacheConfig(2, 16, 1, 8)
    sk = np.ones((3, 2))
    with pytest.raises(AllocationError, match="too small"):
        allocate(sk, sk, [4, 2], cfg, 256, 1000.0)
    with pytest.raises(AllocationError, match="shapes"):
        allocate(sk, np.ones((3, 3)), [4, 2], cfg, 256, 1e6)
    with pytest.raises(AllocationError, match="positive"):
        allocate(sk, sk, [4, 2], cfg, 256, -5)


def test_budget_helpers():
    cfg = CacheConfig(3, 64)
    assert rtn_equivalent_bytes(cfg, 30, 4, 4096) == 2 * 30 * 4096 * 3 * (32 + 4)
    k, v = uniform_budgets(cfg, 30, 600.0)
    assert k == [10.0] * 30 and v == k


def _logits_stepwise(model, ids, layers):
    cache = make_cache(layers)
    outs = []
    with torch.no_grad():
        for t in range(ids.numel()):
            o = model(input_ids=ids[None, t:t + 1], position_ids=torch.tensor([[t]]),
                      attention_mask=torch.ones(1, t + 1, dtype=torch.long), cache=cache, use_cache=True)
            outs.append(o.logits[0])
    return torch.cat(outs)


def _logits_chunked(model, ids, layers, max_chunk=512):
    cache = make_cache(layers)
    outs = []
    with torch.no_grad():
        for a, b in chunk_plan(ids.numel(), layers, max_chunk):
            o = model(input_ids=ids[None, a:b], position_ids=torch.arange(a, b)[None],
                      attention_mask=torch.ones(1, b, dtype=torch.long), cache=cache, use_cache=True)
            outs.append(o.logits[0])
    return torch.cat(outs)


def test_chunked_float_equals_single_forward():
    model = tiny_llama()
    ids = _forward_sample(model, 70)
    with torch.no_grad():
        full = model(ids[None]).logits[0]
    ch = _logits_chunked(model, ids, [FloatLayer() for _ in range(3)], max_chunk=16)
    assert torch.allclose(full, ch, atol=1e-4)


@pytest.mark.parametrize("kind", ["progressive", "kivi", "rtn"])
def test_chunked_equals_token_by_token(kind):
    """The chunk plan gives every query exactly the cache state of token-by-token decoding."""
    model = tiny_llama()
    ids = _forward_sample(model, 56, seed=3)
    n_kv, hd = 2, 16

    def layers():
        if kind == "progressive":
            cfg = CacheConfig(n_kv, hd, 1, 6)
            kb = budget_for_width(cfg, 2, 56)        # shrinks 16 -> 8 -> 4 -> 2 within the text
            vb = budget_for_width(cfg, 4, 56)
            return [ProgressiveLayer(cfg, kb, cfg, vb) for _ in range(3)]
        if kind == "kivi":
            return [KIVILayer(2, group=4, residual=8) for _ in range(3)]  # 56 = 7 residual blocks
        return [RTNLayer(4, n_kv, hd) for _ in range(3)]

    step_layers = layers()
    a = _logits_stepwise(model, ids, step_layers)
    ch_layers = layers()
    b = _logits_chunked(model, ids, ch_layers)
    assert torch.allclose(a, b, atol=2e-4), (a - b).abs().max()
    if kind == "progressive":
        assert step_layers[0].kstore.events == ch_layers[0].kstore.events
        assert [e[1] for e in ch_layers[0].kstore.events] == [8, 4, 2]
        assert ch_layers[0].peak_bytes[True] <= ch_layers[0].kstore.budget + ch_layers[0].vstore.budget
    if kind == "kivi":
        assert ch_layers[0].memory_bytes(True) == kivi_bytes(56, n_kv, hd, 2, 4, 8)


def test_rotated_progressive_chunked_equals_token_by_token():
    """The rotated progressive cache (the default method's) is also exact per query under the chunk plan."""
    model = tiny_llama()
    ids = _forward_sample(model, 56, seed=4)
    cfg = CacheConfig(2, 16, 1, 6)
    kb, vb = budget_for_width(cfg, 2, 56), budget_for_width(cfg, 4, 56)

    def layers():
        return [ProgressiveLayer(cfg, kb, cfg, vb, rotation="hadamard") for _ in range(3)]

    a = _logits_stepwise(model, ids, layers())
    b = _logits_chunked(model, ids, layers())
    assert torch.allclose(a, b, atol=2e-4), (a - b).abs().max()
    plain = _logits_chunked(model, ids, [ProgressiveLayer(cfg, kb, cfg, vb) for _ in range(3)])
    assert not torch.allclose(plain, b, atol=2e-4)   # the rotation changes what is quantised


def test_sensitivity_goes_through_the_rotation():
    model = tiny_llama(num_hidden_layers=2)
    ids = [_forward_sample(model)]
    s0 = C.sensitivity(model, ids, torch.arange(48), [4, 2])
    s1 = C.sensitivity(model, ids, torch.arange(48), [4, 2], rotation="hadamard")
    assert not np.allclose(s0[0], s1[0]) and np.all(s1[0] > 0)


def _mass(n=1024, last=None):
    """A mass profile over n positions: uniform causal attention, or all of it spread over the `last` tokens."""
    t = np.arange(n)[:, None]
    span = t + 1 if last is None else np.minimum(t + 1, last)
    d, s = np.arange(C.MASS_RECENT)[None], np.arange(C.MASS_FIRST)[None]
    return {"recent": np.where(d < span, 1.0 / span, 0.0), "first": np.where(t - s < span, 1.0 / span, 0.0) * (s <= t)}


def _art(n_layers=3, widths=(8, 4, 2), mass=None):
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 2.0, size=(n_layers, 1))
    sk = base * np.array([[0.01, 1.0, 20.0]])[:, :len(widths)]
    return C.Artifacts(factors=None, alphas=None, alpha_mse=None, max_abs_k=[], sens_widths=list(widths),
                       sens_k=sk, sens_v=sk * 0.5, window_mass=_mass() if mass is None else mass)


def test_body_mass_share():
    """Uniform attention: the body's share at position t is its share of the t + 1 tokens; attention spread over
    the last 32 tokens: a 32-token window leaves the body nothing. Past the profile, its last positions' share."""
    n, L = 1024, 1024
    t = np.arange(L)
    want = np.where(t >= 1 + 16, (t + 1 - 1 - 16) / (t + 1), 0.0).mean()
    assert np.isclose(C.body_mass_share(_mass(n), 1, 16, L), want)
    assert C.body_mass_share(_mass(n, last=32), 1, 32, L) == 0.0
    assert np.isclose(C.body_mass_share(_mass(n, last=32), 0, 16, L), 0.5 * (L - 32) / L, atol=0.01)
    share = C.body_mass_share(_mass(n, last=32), 0, 16, 4 * n)       # the tail's steady 0.5
    assert np.isclose(share, (C.body_mass_share(_mass(n, last=32), 0, 16, n) * n + 0.5 * 3 * n) / (4 * n))
    with pytest.raises(ValueError, match="window"):
        C.body_mass_share(_mass(n), 1, C.MASS_RECENT + 16, L)
    with pytest.raises(ValueError, match="mass profile"):
        C.choose_window(C.Artifacts(None, None, None, [], [4, 2], np.ones((1, 2)), np.ones((1, 2))),
                        (4, 2), CacheConfig(2, 64, 1, 16), L, 1e9, True)


def test_window_rule_weighs_windows_by_attention_mass():
    """The budget where uniform attention picks the 16-token window (4-bit bodies): when attention stays in the
    last 32 tokens, a 32-token window leaves the body no mass, so the rule takes it even with 2-bit bodies."""
    cfg = CacheConfig(2, 64, 1, 16)
    L, n = 1024, 3
    tight = n * 2 * budget_for_width(cfg, 4, L)
    c, _, _, _ = C.choose_window(_art(n), (8, 4, 2), cfg, L, tight, True)
    assert c.window == 16
    c, a, tried, shares = C.choose_window(_art(n, mass=_mass(L, last=32)), (8, 4, 2), cfg, L, tight, True)
    assert c.window == 32 and a.objective == 0.0 and shares[32] == 0.0 and shares[16] > 0.4


def test_window_rule_picks_the_window_that_lets_the_body_be_wider():
    """Tight budget: a 128-token window forces 2-bit bodies, a 16-token window affords 4 bits -> 16 wins.
    Generous budget: the widths do not change with the window, so the larger window (fewer body tokens) wins."""
    cfg = CacheConfig(2, 64, 1, 16)
    L, n = 1024, 3
    art = _art(n)
    tight = n * 2 * budget_for_width(cfg, 4, L)            # every layer 4/4 with a 16-token window, no more
    c, a, tried, _ = C.choose_window(art, (8, 4, 2), cfg, L, tight, True)
    assert c.window == 16 and a.key_bits == [4] * n and a.value_bits == [4] * n
    c128 = CacheConfig(2, 64, 1, 128)
    assert n * 2 * budget_for_width(c128, 4, L) > tight      # 4/4 does not fit with the 128-token window
    assert set(tried) == set(C.WINDOW_CHOICES) and tried[16] == min(v for v in tried.values() if v is not None)
    big = n * 2 * budget_for_width(c128, 8, L)
    c, a, _, _ = C.choose_window(art, (8, 4, 2), cfg, L, big, True)
    assert c.window == 128 and a.key_bits == [8] * n
    with pytest.raises(AllocationError):
        C.choose_window(art, (8, 4, 2), cfg, L, n * 2 * budget_for_width(cfg, 2, L) * 0.9, True)


def test_key_weight_moves_the_wide_layers_to_the_keys():
    """Values twice as sensitive as keys: at a budget of half the layers at 4 bits the MILP gives 4 bits to
    values; with the keys' sensitivities x 4 it gives them to the keys. The weight scales only the keys."""
    cfg = CacheConfig(2, 64, 1, 16)
    L, n = 1024, 3
    art = _art(n, (4, 2))
    art.sens_v = art.sens_k * 2.0
    half = n * (budget_for_width(cfg, 4, L) + budget_for_width(cfg, 2, L))
    wide = lambda bits: sum(b == 4 for b in bits)     # noqa: E731
    _, a, _, _ = C.choose_window(art, (4, 2), cfg, L, half, True, windows=(16,))
    assert wide(a.value_bits) >= n - 1 and wide(a.key_bits) <= 1
    _, a, _, _ = C.choose_window(art, (4, 2), cfg, L, half, True, windows=(16,), key_weight=4.0)
    assert wide(a.key_bits) >= n - 1 and wide(a.value_bits) <= 1
    sk, sv = C.sens_for(art, (4, 2), 4.0)
    assert np.allclose(sk, 4 * art.sens_k) and np.allclose(sv, art.sens_v)
    with pytest.raises(ValueError, match="key_weight"):
        C.sens_for(art, (4, 2), 0.0)


def test_best_table_records_rotation_and_window(tmp_path):
    from pmkvq_accel.calib import table as T
    model = tiny_llama()
    fp = T.model_fingerprint(model)
    cfg = CacheConfig(fp["num_key_value_heads"], fp["head_dim"], 1, 32)
    L = 512
    art = _art(3)
    art.settings = {**C.best_settings().__dict__, "rotation": "hadamard"}
    art.text_desc = "x"
    d = C.make_table(model, art, model_id="tiny", cfg=cfg, max_len=L, budget=6 * budget_for_width(cfg, 4, L),
                     budget_src="test", widths=C.BEST["widths"], separate_kv=True, factors_rel=None,
                     windows=(32, 64, 128))
    assert d["cache"]["rotation"] == "hadamard" and d["cache"]["window"] in (32, 64, 128)
    assert d["allocation"]["window_choice"]["chosen"] == d["cache"]["window"]
    assert all(lb["window"] == d["cache"]["window"] for lb in d["layers"])
    T.save_table(d, tmp_path / "t.json")
    t = T.load_table(tmp_path / "t.json", model.config)
    assert t.rotation == "hadamard" and t.window == d["cache"]["window"]
