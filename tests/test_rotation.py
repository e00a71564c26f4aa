"""KV rotation (host/rotation.py): the matrix, the evaluation path (calib/quantsim.py), the table flag and the
host attention hook (host/hf.py) that applies it around the device."""
import copy

import numpy as np
import pytest
import torch

from pmkvq_accel.host.rotation import check_rotation, hadamard, rotate


@pytest.mark.parametrize("n", [1, 2, 16, 64, 128])
def test_hadamard_is_symmetric_orthogonal(n):
    h = hadamard(n)
    assert h.shape == (n, n)
    np.testing.assert_allclose(h, h.T)
    np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-12)
    assert np.all(np.abs(np.abs(h) - 1 / np.sqrt(n)) < 1e-12)   # every entry +-1/sqrt(n): it spreads channels


def test_bad_rotation_and_head_dim():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)
    with pytest.raises(ValueError, match="unknown KV rotation"):
        check_rotation("givens")
    assert check_rotation(None) == "none"


def test_rotate_numpy_and_torch_round_trip_and_dot_products():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(3, 64)), rng.normal(size=(5, 64))
    np.testing.assert_allclose(rotate(q, "hadamard") @ rotate(k, "hadamard").T, q @ k.T, atol=1e-12)
    np.testing.assert_allclose(rotate(rotate(k, "hadamard"), "hadamard", inverse=True), k, atol=1e-12)
    t = torch.from_numpy(k).float()
    assert torch.allclose(rotate(t, "hadamard"), torch.from_numpy(rotate(k, "hadamard")).float(), atol=1e-5)
    assert rotate(k, "none") is k


def test_rotation_cuts_per_token_error_on_outlier_channels():
    """Keys with a few large fixed channels (as SmolLM2's): 4-bit per-token error is much smaller rotated."""
    from pmkvq_accel.calib.quantsim import fake_quant
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 256, 64, generator=g, dtype=torch.float64)
    k[..., [3, 35]] *= 12.0
    plain = (fake_quant(k, 4, via16=True) - k).pow(2).mean()
    rot = (fake_quant(k, 4, via16=True, rotation="hadamard") - k).pow(2).mean()
    assert rot < 0.5 * plain, (float(rot), float(plain))
    # at 16 bits both are (nearly) lossless and the rotated path comes back in the model's frame
    assert (fake_quant(k, 16, rotation="hadamard") - k).abs().max() < 0.1


def test_quantsim_layer_returns_model_frame():
    from pmkvq_accel.calib.quantsim import RTNLayer, make_cache
    k = torch.randn(1, 2, 8, 32)
    v = torch.randn(1, 2, 8, 32)
    layer = RTNLayer(16, 2, 32, rotation="hadamard")
    make_cache([layer])
    kk, vv = layer.update(k, v)
    # 16-bit golden codes: the bf16 zero limits the error to ~|min| * 2^-8
    assert torch.allclose(kk, k, atol=3e-2) and torch.allclose(vv, v, atol=3e-2)
    stored = layer.keys  # what the cache holds: rotated keys
    assert torch.allclose(stored, rotate(k, "hadamard"), atol=3e-2)
    assert not torch.allclose(stored, k, atol=3e-2)


def _tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _table(model, rotation, bits=16, max_len=256):
    from pmkvq_accel.calib import table as T
    from pmkvq_accel.model.cache import CacheConfig, budget_for_width
    cfg = CacheConfig(2, 32, 1, 32)
    b = [budget_for_width(cfg, bits, max_len)] * 2
    d = T.build_table_dict(model, model_id="tiny", key_budgets=b, value_budgets=b, max_len=max_len, window=32,
                           rotation=rotation)
    return d, T.table_from_dict(d)


def test_table_rotation_flag_round_trip_and_errors(tmp_path):
    from pmkvq_accel.calib import table as T
    model = _tiny()
    d, t = _table(model, "hadamard")
    assert d["cache"]["rotation"] == "hadamard" and t.rotation == "hadamard"
    T.save_table(d, tmp_path / "t.json")
    assert T.load_table(tmp_path / "t.json", model.config).rotation == "hadamard"
    d0, t0 = _table(model, "none")
    assert "rotation" not in d0["cache"] and t0.rotation == "none"       # old tables read as no rotation
    bad = copy.deepcopy(d)
    bad["cache"]["rotation"] = "givens"
    with pytest.raises(T.TableError, match="rotation"):
        T.table_from_dict(bad)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_host_hook_rotates_query_key_value_and_output(rotation):
    """16-bit cache (no shrink within the run): the device decode must match the float model whether or not
    the cache holds rotated K/V, which needs q rotated like k and the output rotated back."""
    from pmkvq_accel.host.decode import float_agreement, greedy_decode
    from pmkvq_accel.host.device import GoldenDevice
    from pmkvq_accel.host.hf import kv_cache_for
    model = _tiny()
    _, table = _table(model, rotation)
    dev = GoldenDevice()
    kv = kv_cache_for(model, table, dev)
    assert kv.rotation == rotation
    prompt = list(range(3, 60))
    res = greedy_decode(model, kv, prompt, 8, progress=False)
    agree = float_agreement(model, res.prompt_ids, res.new_ids, res.logprobs)
    assert agree["mean_kl"] < 1e-4 and agree["top1_match"] == 1.0, agree
    if rotation == "hadamard":   # what the device holds is rotated: the first key's codes are not the plain key's
        kv_plain = kv_cache_for(model, _table(model, "none")[1], GoldenDevice())
        res_plain = greedy_decode(model, kv_plain, prompt, 8, progress=False)
        assert res_plain.new_ids == res.new_ids
