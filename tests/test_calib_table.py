"""Bit-width table: schema, consistency checks, model matching, reparameterisation folding."""
import copy
import json

import pytest
import torch

from pmkvq_accel.calib import table as T
from pmkvq_accel.model.cache import BudgetError, CacheConfig, LayerKVCache, budget_for_width
from pmkvq_accel.model.llm import attention_modules


def tiny_llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    cfg.update(kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def make_table(model, bits=(4, 2, 4), max_len=512, **kw):
    fp = T.model_fingerprint(model)
    cfg = CacheConfig(fp["num_key_value_heads"], fp["head_dim"], 1, 32)
    kb = [budget_for_width(cfg, b, max_len) for b in bits]
    return T.build_table_dict(model, model_id="tiny", key_budgets=kb, value_budgets=kb, max_len=max_len,
                              window=32, **kw)


def test_roundtrip_and_budgets_usable(tmp_path):
    model = tiny_llama()
    data = make_table(model)
    p = T.save_table(data, tmp_path / "t.json")
    t = T.load_table(p, model.config)
    assert t.key_bits == [4, 2, 4] and t.value_bits == [4, 2, 4]
    assert t.max_len == 512 and t.window == 32 and t.n_sink == 1 and t.count_metadata
    assert t.layers[0].key_schedule[-1] == (t.layers[0].key_schedule[-1][0], 4)
    # budgets work as LayerKVCache budgets: max_len tokens fit and the body ends at the table's width
    caches = t.layer_caches()
    x = torch.randn(2, 512, 16).numpy()
    for c, lb in zip(caches, t.layers):
        assert isinstance(c, LayerKVCache)
        c.append(x, x)
        assert c.keys.body_bits == lb.key_bits
        assert c.memory_bytes(True) <= lb.key_budget_bytes + lb.value_budget_bytes
    assert T.default_table_path().name == "SmolLM2-135M-Instruct.json"


def test_wrong_model_is_reported(tmp_path):
    p = T.save_table(make_table(tiny_llama()), tmp_path / "t.json")
    other = tiny_llama(num_key_value_heads=4)
    with pytest.raises(T.TableMismatchError, match="num_key_value_heads"):
        T.load_table(p, other.config)
    with pytest.raises(T.TableMismatchError, match="config_hash"):
        T.load_table(p, tiny_llama(vocab_size=256).config)


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.pop("layers"), "schema"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(format="x"), "not a PM-KVQ"),
    (lambda d: d["layers"][0].update(key_bits=3), "schema"),
    (lambda d: d["layers"][0].update(key_bits=8), "ends at 4 bits"),
    (lambda d: d["layers"][1].update(value_budget_bytes=100), "cannot hold"),
    (lambda d: d["layers"].pop(), "layer entries"),
    (lambda d: d["layers"][0]["key_schedule"].pop(), "differs"),
    (lambda d: d["model"].update(config_hash="xyz"), "schema"),
])
def test_malformed_tables(tmp_path, mutate, msg):
    data = make_table(tiny_llama())
    bad = copy.deepcopy(data)
    mutate(bad)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(T.TableError, match=msg):
        T.load_table(p)


def test_not_json_and_missing(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(T.TableError, match="not valid JSON"):
        T.load_table(p)
    with pytest.raises(FileNotFoundError):
        T.load_table(tmp_path / "nope.json")


def test_budget_too_small_when_building():
    model = tiny_llama()
    with pytest.raises(BudgetError):
        T.build_table_dict(model, model_id="tiny", key_budgets=[10.0] * 3, value_budgets=[10.0] * 3, max_len=512)


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1}])
def test_reparam_fold_preserves_logits(tmp_path, kw):
    model = tiny_llama(**kw)
    fp = T.model_fingerprint(model)
    g = torch.Generator().manual_seed(1)
    factors = []
    for _ in range(fp["num_hidden_layers"]):
        half = torch.rand(fp["num_key_value_heads"], fp["head_dim"] // 2, generator=g) * 10 + 0.1
        factors.append(torch.cat([half, half], dim=1))
    ids = torch.randint(0, 128, (1, 40), generator=g)
    with torch.no_grad():
        ref = model(ids).logits
    fpath = T.save_factors(tmp_path / "f.safetensors", factors, model, "tiny")
    data = make_table(model, reparam={"path": fpath.name, "alphas": [0.5] * 3})
    p = T.save_table(data, tmp_path / "t.json")
    t = T.load_table(p, model.config)
    T.apply_reparam(model, t)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="already applied"):
        T.apply_reparam(model, t)


def test_factors_must_respect_rope_pairs():
    model = tiny_llama()
    bad = [torch.arange(1, 33, dtype=torch.float32).reshape(2, 16)] * 3
    with pytest.raises(ValueError, match="RoPE channel pair"):
        T.fold_factors(model, bad)


def test_attention_modules_in_layer_order():
    """model/llm.py's helper (the host and calibration both use it): one self-attention per decoder layer."""
    model = tiny_llama()
    mods = attention_modules(model)
    assert len(mods) == 3 and all(m is layer.self_attn for m, layer in zip(mods, model.model.layers))
    with pytest.raises(TypeError, match="Llama/Qwen2"):
        attention_modules(torch.nn.Linear(2, 2))


def test_reparam_fold_qwen2_with_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    for attn in attention_modules(model):
        assert attn.k_proj.bias is not None
        torch.nn.init.normal_(attn.k_proj.bias)
        torch.nn.init.normal_(attn.q_proj.bias)
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        ref = model(ids).logits
    half = torch.rand(2, 8) * 5 + 0.2
    T.fold_factors(model, [torch.cat([half, half], 1)] * 2)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_committed_default_table_fits_default_model():
    """The committed table loads against the real default model and its factors leave the logits unchanged."""
    from pmkvq_accel.model.llm import DEFAULT_MODEL, cache_root, load_model
    if not (cache_root() / "models" / DEFAULT_MODEL / "config.json").is_file():
        pytest.skip("default model not converted yet (make calib / make run does it once)")
    model, tok = load_model(device="cpu")
    t = T.load_table(T.default_table_path(), model.config)
    assert t.model_id == DEFAULT_MODEL and t.n_layers == model.config.num_hidden_layers
    ids = tok("def f(x):\n    return x + 1\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
    T.apply_reparam(model, t)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out, ref, atol=2e-3, rtol=1e-3), (out - ref).abs().max()
