"""`python host/run.py` end to end on the real default model, the HF hook, and its error exits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "host" / "run.py")]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture
def one_thread():
    """Model tests run torch on one thread: with several, a busy shared machine slows them 10x."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(*args, timeout=240):
    return subprocess.run([*RUN, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, msg", [
    (["--board", "u280", "--xclbin", "missing/k.xclbin"], "missing/k.xclbin does not exist"),
    (["--board", "vcu118"], "invalid choice: 'vcu118'"),
    (["--max-new-tokens", "0"], "at least 1"),
])
def test_cli_errors_are_clear(args, msg):
    r = run(*args)
    assert r.returncode == 2
    assert msg in r.stderr
    assert "Traceback" not in r.stderr


def model_config():
    from transformers import AutoConfig

    from pmkvq_accel.model.llm import resolve_model_dir
    return AutoConfig.from_pretrained(resolve_model_dir())


def test_table_for_another_model(tmp_path, capsys):
    ct = pytest.importorskip("pmkvq_accel.calib.table")
    from pmkvq_accel.host.table import load_for_model
    other = model_config().to_dict()
    other["num_hidden_layers"] = 2
    path = ct.save_table(ct.build_table_dict(other, model_id="other", key_budgets=[1e6] * 2,
                                             value_budgets=[1e6] * 2, max_len=1024), tmp_path / "other.json")
    with pytest.raises(ValueError, match="does not match the loaded model"):
        load_for_model(model_config(), path)
    from pmkvq_accel.host.run import cli
    assert cli(["--table", str(path), "--no-progress"]) == 2
    assert "num_hidden_layers: table has 2, model has 30" in capsys.readouterr().err


def test_fallback_table_budget_matches_reference():
    from pmkvq_accel.host.table import fallback_table
    from pmkvq_accel.model.cache import shrink_schedule
    t = fallback_table(30, 3, 64, bits=4, max_len=2048)
    lb = t.layers[0]
    assert "fallback" in t.label and len(t.layers) == 30
    assert shrink_schedule(lb.cache_config(3, 64), lb.key_budget_bytes, 2048)[-1][1] == 4 == lb.key_bits


def test_run_decodes_default_model(tmp_path, capsys, one_thread):
    """`python host/run.py` with its defaults (in process, to share the interpreter's imports)."""
    from pmkvq_accel.host.run import cli
    out = tmp_path / "m.json"
    assert cli(["--max-new-tokens", "5", "--no-progress", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    for text in ("generated text", "KV cache:", "float16", "layer widths now", "tokens/s",
                 "float-model agreement"):
        assert text in stdout
    m = json.loads(out.read_text())
    assert m["board"] == "golden" and m["new_tokens"] == 5 and len(m["widths"]) == 30
    assert m["kv_bytes_codes_only"] <= m["kv_bytes_with_metadata"]
    assert m["agreement"]["top1_match"] >= 0.75 and m["agreement"]["mean_kl"] < 0.05


def test_hook_sends_every_decode_attention_to_the_device(one_thread):
    import torch

    from pmkvq_accel.host.decode import greedy_decode
    from pmkvq_accel.host.device import GoldenDevice
    from pmkvq_accel.host.hf import kv_cache_for
    from pmkvq_accel.host.table import fallback_table
    from pmkvq_accel.model.llm import load_model
    model, tok = load_model(device="cpu")
    table = fallback_table(30, 3, 64, bits=2, max_len=256)  # small budgets: shrinks happen within 200 tokens
    dev = GoldenDevice()
    kv = kv_cache_for(model, table, dev)
    prompt = tok("The quick brown fox jumps over the lazy dog. " * 18).input_ids[:190]
    res = greedy_decode(model, kv, prompt, 6, progress=False)
    assert dev.kernel.launches["ATTENTION"] == 30 * 5  # every layer of every decode step (not the prefill)
    assert dev.kernel.launches["COPY"] > 0 and dev.kernel.launches["SHRINK"] > 0
    assert kv.tokens() == len(prompt) + 5
    assert all(w[0] < 16 for w in (kv.widths(i) for i in range(30)))
    with torch.inference_mode():  # the model is back to float attention afterwards
        assert model.config._attn_implementation != "pmkvq"
    assert len(res.new_ids) == 6 and np.isfinite(res.logprobs).all()
