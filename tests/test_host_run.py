"""`python host/run.py` end to end on the real default model (no warnings), and its error exits. The hook and
the public API (`pmkvq_accel.accelerate`) are tests/test_api.py's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "host" / "run.py")]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def run(*args, timeout=240):
    return subprocess.run([*RUN, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_no_board_is_a_clear_error():
    r = run("--board", "u280", "--xclbin", "missing/k.xclbin")
    assert r.returncode == 2
    assert "missing/k.xclbin does not exist" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, msg", [
    (["--board", "vcu118"], "invalid choice: 'vcu118'"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1, got 0"),
    (["--threads", "0"], "--threads: must be at least 1, got 0"),
    (["--threads", "two"], "--threads: not an integer: 'two'"),
    (["--seed", "-1"], "--seed: must be at least 0"),
    (["--prompt-tokens", "0"], "--prompt-tokens: must be at least 1"),
    (["--prompt", "hi", "--prompt-tokens", "8"], "not both"),
    (["--xclbin", "k.xclbin"], "--xclbin is for --board u280"),
    (["--json", "no/such/folder/m.json"], "folder no/such/folder does not exist"),
    (["--engines", "0"], "--engines: must be at least 1, got 0"),
    (["--engines", "33"], "--engines 33: at most 32"),
    (["--board", "u280", "--engines", "4"], "--engines is for --board golden and sim"),
])
def test_nonsensical_options_are_usage_errors(args, msg, capsys):
    from pmkvq_accel.host.run import cli
    with pytest.raises(SystemExit) as e:
        cli(args)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


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


def test_run_decodes_default_model(tmp_path):
    """A plain `python host/run.py` (as `make run` starts it): decodes through pmkvq_accel.accelerate and
    transformers' generate, prints every figure, and no warning (no deprecated transformers argument)."""
    out = tmp_path / "m.json"
    r = run("--max-new-tokens", "5", "--no-progress", "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    for text in ("generated text", "KV cache:", "float16", "layer widths now", "tokens/s", "device launches:",
                 "output digest", "float-model agreement"):
        assert text in r.stdout
    assert "Warning" not in r.stderr and "deprecated" not in r.stderr.lower()
    m = json.loads(out.read_text())
    assert m["board"] == "golden" and m["new_tokens"] == 5 and len(m["widths"]) == 30
    assert m["launches"]["ATTENTION"] == 30 * 4 and m["logprobs_sha256_16"] == m["digest"]
    assert m["kv_bytes_codes_only"] <= m["kv_bytes_with_metadata"]
    assert m["agreement"]["top1_match"] >= 0.75 and m["agreement"]["mean_kl"] < 0.05


def test_bench_rejects_nonsense():
    r = subprocess.run([sys.executable, str(ROOT / "host" / "bench.py"), "--threads", "0"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--threads: must be at least 1, got 0" in r.stderr


def test_bench_runs_small(tmp_path, capsys):
    """`python host/bench.py` on a tiny workload: both decodes through transformers' generate, the
    accelerated one through pmkvq_accel.accelerate."""
    import torch

    from pmkvq_accel.host.bench import cli
    out = tmp_path / "b.json"
    n = torch.get_num_threads()
    try:
        assert cli(["--prompt-tokens", "16", "--new-tokens", "3", "--float-steps", "2", "--threads", "1",
                    "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    assert "float model alone" in capsys.readouterr().out
    b = json.loads(out.read_text())
    assert b["prompt_tokens"] == 16 and b["new_tokens"] == 3 and b["launches"]["ATTENTION"] == 30 * 2
    assert b["tokens_per_s"] > 0 and b["float_tokens_per_s"] > 0
