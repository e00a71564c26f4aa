"""--board sim: the kernel RTL on Verilator behind the host's device interface agrees with --board golden bit
for bit on a real-model decode (window flushes, shrinks and attention launches on the device), and its errors
are clear. The tests use the 128-bit kernel the kernel tests build (the memory layout does not depend on the
word width); `python host/run.py --board sim` builds the U280's 512-bit configuration."""
import numpy as np
import pytest

from pmkvq_accel.host.device import DeviceError, DeviceUnavailable, GoldenDevice, SimDevice
from pmkvq_accel.sim.kernel_build import shared_test_config
from device_compare import assert_same_cache_results, one_layer_cache

_CFG = shared_test_config()     # = tests/kernel's build (shared): its word width, engines, PCs and SLR stages
SMALL = dict(word_bits=_CFG.word_bits, max_tokens=_CFG.max_tokens, engines=_CFG.engines,
             slr_stages=_CFG.slr_stages, progress=None)


def cache_bytes(kv):
    return [buf.read(0, buf.nbytes) for buf in kv.bufs]


def test_real_model_decode_matches_golden_bit_for_bit(model):
    from pmkvq_accel.host.decode import greedy_decode
    from pmkvq_accel.host.hf import kv_cache_for
    from pmkvq_accel.host.table import fallback_table
    m, tok = model
    table = fallback_table(30, 3, 64, bits=2, max_len=256)   # small budgets: flushes and shrinks in 200 tokens
    prompt = tok("The quick brown fox jumps over the lazy dog. " * 18).input_ids[:190]
    runs = {}
    for name, dev in (("golden", GoldenDevice(engines=2)), ("sim", SimDevice(**SMALL))):
        try:
            kv = kv_cache_for(m, table, dev)
            runs[name] = (greedy_decode(m, kv, prompt, 5, progress=False), cache_bytes(kv), kv)
        finally:
            dev.close()
    (g, g_mem, g_kv), (s, s_mem, s_kv) = runs["golden"], runs["sim"]
    assert s.new_ids == g.new_ids
    assert np.array_equal(s.logprobs, g.logprobs)            # every attention output identical
    assert all(np.array_equal(a, b) for a, b in zip(s_mem, g_mem))  # every cache byte (SHRINK/COPY on the RTL)
    assert all(s_kv.widths(i) == g_kv.widths(i) for i in range(30))
    assert any(s_kv.widths(i)[0] < 16 for i in range(30))    # the RTL did shrink
    assert len(s.cycles_per_step) == 4 and min(s.cycles_per_step) > 30 * 100
    assert not g.cycles_per_step


def test_cache_manager_on_the_rtl_matches_golden():
    """Random appends (prompt-sized and single tokens) through window flushes and shrinks at 4 bits."""
    devs = [SimDevice(**SMALL), GoldenDevice(engines=2)]
    try:
        sim, gold = assert_same_cache_results(*devs, appends=(300, 1, 1, 250, 1), seed=3)
        assert sim.widths(0) == gold.widths(0) != (16, 16)
        assert all(sum(c) for c in sim.slices(0))             # both engines hold part of the context
        assert np.array_equal(cache_bytes(sim)[0], cache_bytes(gold)[0])
    finally:
        for d in devs:
            d.close()


@pytest.fixture
def sim_cache():
    dev = SimDevice(**SMALL)
    kv = one_layer_cache(dev, max_len=256)
    kv.append(0, np.ones((3, 10, 64)), np.ones((3, 10, 64)))
    yield kv
    dev.close()


def test_kernel_reading_outside_memory_is_an_error(sim_cache):
    sim_cache.bases["e0_base"] += 1 << 30   # nothing is allocated there (engine 0 holds all 10 tokens)
    with pytest.raises(DeviceError, match="outside every buffer"):
        sim_cache.attention(0, np.ones((9, 64)), 0.125)


def test_bad_status_from_the_rtl_is_reported(sim_cache):
    with pytest.raises(DeviceError, match="BAD_OP"):
        sim_cache.kernel.launch(**{**sim_cache.layers[0].args, "op": 9})


def test_unsupported_model_shape_and_misuse():
    dev = SimDevice(**SMALL)
    with pytest.raises(DeviceUnavailable, match="cannot be built for this model.*head_dim 48"):
        dev.prepare(head_dim=48, group=3)
    with pytest.raises(DeviceError, match="prepare"):
        dev.allocate(64)


def test_simulator_dying_is_a_device_error(sim_cache):
    sim_cache.device.sim.proc.kill()
    sim_cache.device.sim.proc.wait()
    with pytest.raises(DeviceError, match="sim: the kernel simulator exited"):
        sim_cache.attention(0, np.ones((9, 64)), 0.125)


def test_run_py_on_sim_prints_cycles_and_matches_golden_digest(tmp_path, capsys, monkeypatch, model):
    """`python host/run.py --board sim` end to end (in process, on the small build): the kernel cycles and the U280
    projection are printed, and the output digest equals the golden run's."""
    import functools
    import json

    from pmkvq_accel.host import device as D
    from pmkvq_accel.host.run import cli
    monkeypatch.setattr(D, "SimDevice", functools.partial(SimDevice, **SMALL))
    metrics = {}
    for board in ("golden", "sim"):
        out = tmp_path / f"{board}.json"
        assert cli(["--board", board, "--max-new-tokens", "3", "--no-progress", "--no-compare",
                    "--json", str(out)]) == 0
        metrics[board] = json.loads(out.read_text())
    stdout = capsys.readouterr().out
    assert "cycles per token" in stdout and "MHz on the U280" in stdout
    assert metrics["sim"]["cycles_per_token"] > 0 and "cycles_per_token" not in metrics["golden"]
    assert metrics["sim"]["logprobs_sha256_16"] == metrics["golden"]["logprobs_sha256_16"]
    assert metrics["sim"]["text"] == metrics["golden"]["text"]
