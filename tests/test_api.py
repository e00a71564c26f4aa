"""The public entry point `pmkvq_accel.accelerate`: the README example runs as written, transformers' own
`model.generate` (greedy, sampling, stopping criteria, streamer) decodes on the device, the run's stats are
right, the model gets its weights and generate() back, what it cannot do is refused clearly, and the installed
console scripts resolve."""
import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pmkvq_accel
from pmkvq_accel.host.device import GoldenDevice

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Use it from Python\n.*?```python\n(.*?)```", text, re.S)
    assert m, "README.md has no python block under '## Use it from Python'"
    return m.group(1)


def run_readme(capsys, replace=()):
    """Run the README example (with these (old, new) text replacements); (its namespace, its stdout)."""
    code = readme_example()
    for a, b in replace:
        assert a in code, f"the README example no longer contains {a!r}"
        code = code.replace(a, b)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    return ns, capsys.readouterr().out


@pytest.fixture
def loaded(model, monkeypatch):
    """load_model in the README returns the module's already loaded model (the example restores its weights)."""
    from pmkvq_accel.model import llm
    m, tok = model
    monkeypatch.setattr(llm, "load_model", lambda *a, **k: (m, tok))
    return m, tok


def test_readme_example_runs_on_golden(loaded, capsys):
    m, tok = loaded
    before = {n: p.detach().clone() for n, p in m.named_parameters() if "self_attn" in n}
    ns, out = run_readme(capsys)
    acc, seq = ns["acc"], ns["out"]
    st = acc.stats
    n_prompt = ns["prompt"]["input_ids"].shape[1]
    assert st.board == "golden" and st.prompt_tokens == n_prompt and st.new_tokens == seq.shape[1] - n_prompt
    assert 1 <= st.new_tokens <= 20 and st.tokens == seq.shape[1] - 1
    # the streamer printed the generated text, then the summary
    assert tok.decode(seq[0, n_prompt:], skip_special_tokens=True).strip()[:20] in out
    assert "KV cache:" in out and "float16" in out and f"output digest {st.digest}" in out
    assert st.launches["ATTENTION"] == 30 * st.decode_steps and st.launches["total"] >= st.launches["ATTENTION"]
    assert st.kv_bytes_codes_only <= st.kv_bytes_with_metadata and st.fp16_bytes > 0 and len(st.widths) == 30
    assert st.cycles is None and re.fullmatch(r"[0-9a-f]{16}", st.digest)
    # the with block gave back transformers' generate, float attention and the original weights
    assert "generate" not in m.__dict__ and m.config._attn_implementation != "pmkvq"
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters() if "self_attn" in n)


def test_readme_example_runs_on_sim_bit_identical(loaded, capsys, monkeypatch):
    """board="sim" on the 128-bit kernel the sim tests build (4 new tokens: the RTL is slow): the same tokens
    and the same digest as golden."""
    import functools

    from pmkvq_accel.host import device as D
    from test_host_sim import SMALL
    m, tok = loaded
    short = [("max_new_tokens=20", "max_new_tokens=4")]
    golden, _ = run_readme(capsys, short)
    monkeypatch.setattr(D, "SimDevice", functools.partial(D.SimDevice, **SMALL))
    ns, out = run_readme(capsys, short + [('board="golden"', 'board="sim"')])
    assert "cycles per token" in out
    st, gst = ns["acc"].stats, golden["acc"].stats
    assert st.board == "sim" and gst.board == "golden" and st.new_tokens == 4
    assert st.digest == gst.digest and torch.equal(ns["out"], golden["out"])
    assert st.cycles > 0 and len(st.cycles_per_step) == st.decode_steps == 3
    assert st.launches["total"] == gst.launches["total"]


@pytest.fixture
def acc(model):
    m, tok = model
    with pmkvq_accel.accelerate(m, tok) as a:
        yield a


def prompt_ids(tok, text="The quick brown fox"):
    return torch.tensor([tok(text).input_ids])


def test_generate_greedy_equals_the_accelerator_call_and_folds_reversibly(model):
    m, tok = model
    ids = prompt_ids(tok)
    w = m.model.layers[0].self_attn.k_proj.weight.detach().clone()
    acc = pmkvq_accel.accelerate(m, tok)
    assert acc.reparam_folded and not torch.equal(m.model.layers[0].self_attn.k_proj.weight, w)
    a = m.generate(ids, max_new_tokens=4, do_sample=False)
    first = acc.stats
    b = acc.generate(ids, max_new_tokens=4, do_sample=False)     # a second sequence: a fresh device cache
    assert torch.equal(a, b) and acc.stats.digest == first.digest and acc.stats is not first
    assert acc.text == tok.decode(b[0, ids.shape[1]:], skip_special_tokens=True)
    with pytest.raises(ValueError, match="already accelerated"):
        pmkvq_accel.accelerate(m, tok)
    acc.close()
    acc.close()                                                  # idempotent
    assert torch.equal(m.model.layers[0].self_attn.k_proj.weight, w) and "generate" not in m.__dict__
    with pytest.raises(RuntimeError, match="closed"):
        acc.generate(ids, max_new_tokens=2)
    with pmkvq_accel.accelerate(m, tok):                        # and it can be accelerated again
        assert torch.equal(m.generate(ids, max_new_tokens=4, do_sample=False), a)


def test_sampling_is_seeded_and_on_the_device(acc, model):
    m, tok = model
    ids = prompt_ids(tok, "Once upon a time")
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(m.generate(ids, do_sample=True, temperature=0.9, top_k=40, max_new_tokens=5, eos_token_id=None))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == ids.shape[1] + 5
    assert acc.stats.launches["ATTENTION"] == 30 * 4


def test_stopping_criteria_and_streamer(acc, model, capsys):
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer
    m, tok = model
    ids = prompt_ids(tok)

    class AfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 3, dtype=torch.bool)

    out = m.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                     stopping_criteria=StoppingCriteriaList([AfterThree()]), streamer=TextStreamer(tok, skip_prompt=True))
    assert out.shape[1] == ids.shape[1] + 3 and acc.stats.new_tokens == 3
    assert capsys.readouterr().out.strip() == tok.decode(out[0, ids.shape[1]:]).strip()


def test_small_budgets_shrink_on_the_device(model):
    """A fallback table with tiny budgets: window flushes and shrinks within 200 tokens, all counted."""
    from pmkvq_accel.host.table import fallback_table
    m, tok = model
    dev = GoldenDevice()
    table = fallback_table(30, 3, 64, bits=2, max_len=256)
    ids = prompt_ids(tok, "The quick brown fox jumps over the lazy dog. " * 18)[:, :190]
    with pmkvq_accel.accelerate(m, tok, board=dev, table=table) as acc:
        assert not acc.reparam_folded
        m.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
        st = acc.stats
    assert st.launches == {**dev.kernel.launches, "total": sum(dev.kernel.launches.values())}
    assert st.launches["ATTENTION"] == 30 * 5 and st.launches["SHRINK"] > 0 and st.launches["COPY"] > 0
    assert st.prompt_tokens == ids.shape[1] and st.tokens == ids.shape[1] + 5
    assert all(w[0] < 16 for w in st.widths)
    assert st.kv_bytes_with_metadata < st.fp16_bytes


@pytest.mark.parametrize("kwargs, error, msg", [
    (dict(input_ids=torch.ones(2, 4, dtype=torch.long)), pmkvq_accel.Unsupported, "batch size 2"),
    (dict(num_beams=2), pmkvq_accel.Unsupported, "beam search"),
    (dict(prefill_chunk_size=2), pmkvq_accel.Unsupported, "chunked prefill"),
    (dict(attention_mask=torch.tensor([[0, 1, 1, 1]])), pmkvq_accel.Unsupported, "padding"),
    (dict(past_key_values=object()), pmkvq_accel.Unsupported, "supplies the cache"),
    (dict(max_new_tokens=10 ** 6), pmkvq_accel.ContextTooLong, "exceeds the bit-width table's max_len"),
])
def test_what_it_cannot_do_is_refused_before_running(acc, model, kwargs, error, msg):
    m, tok = model
    kwargs = {"input_ids": torch.ones(1, 4, dtype=torch.long), "max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=msg):
        m.generate(**kwargs)
    assert acc.kv.tokens() == 0 and m.config._attn_implementation != "pmkvq"


def test_unsupported_model_family():
    from transformers import GPT2Config, GPT2LMHeadModel
    tiny = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    with pytest.raises(pmkvq_accel.Unsupported, match="model type 'gpt2' is not supported"):
        pmkvq_accel.accelerate(tiny)


def test_table_for_another_model_is_refused(model, tmp_path):
    ct = pytest.importorskip("pmkvq_accel.calib.table")
    m, _ = model
    other = copy.deepcopy(m.config.to_dict())
    other["num_hidden_layers"] = 2
    path = ct.save_table(ct.build_table_dict(other, model_id="other", key_budgets=[1e6] * 2,
                                             value_budgets=[1e6] * 2, max_len=1024), tmp_path / "other.json")
    with pytest.raises(ValueError, match="does not match the loaded model"):
        pmkvq_accel.accelerate(m, table=path)
    assert "generate" not in m.__dict__


def test_stats_summary_and_dict(acc, model):
    m, tok = model
    m.generate(prompt_ids(tok), max_new_tokens=3, do_sample=False)
    st = acc.stats
    d = st.as_dict()
    assert d["new_tokens"] == 3 and d["widths"][0] == list(st.widths[0]) and "logprobs" not in d
    assert "cycles_per_token" not in d                    # golden counts no cycles
    s = st.summary()
    assert f"{st.tokens} tokens x 30 layers" in s and "device launches: 60 (ATTENTION 60" in s
    assert np.isfinite(st.tokens_per_s)


def test_console_scripts_resolve_and_run_help():
    from importlib.metadata import entry_points
    eps = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("pmkvq-")}
    assert {"pmkvq-run", "pmkvq-bench", "pmkvq-calib", "pmkvq-eval", "pmkvq-bitstream"} <= set(eps)
    for ep in eps.values():
        assert callable(ep.load()), ep.name
    exe = Path(sys.executable).parent / "pmkvq-run"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: pmkvq-run") and "--max-new-tokens" in r.stdout


def test_import_is_light():
    """`import pmkvq_accel` loads neither NumPy nor torch (host/run.py sets thread variables before NumPy)."""
    r = subprocess.run([sys.executable, "-c", "import sys, pmkvq_accel; print('numpy' in sys.modules, "
                        "'torch' in sys.modules, callable(pmkvq_accel.accelerate))"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "False", "True"], r.stderr
