"""The golden backend executes the kernel contract (docs/kernel-interface.md) from registers and device memory:
its fast path is bit-identical to the golden model itself, and bad launches come back as status codes."""
import numpy as np
import pytest

from pmkvq_accel.hw import regmap as L
from pmkvq_accel.host.device import DeviceError, GoldenDevice, Kernel
from pmkvq_accel.host.kvcache import DeviceKVCache
from pmkvq_accel.model.cache import CacheConfig, budget_for_width
from pmkvq_accel.model.quant import pack_codes, unpack_codes, unpack_rows


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_unpack_rows_matches_unpack_codes(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 37, 32)).astype(np.uint16)
    rows = np.stack([pack_codes(c, bits) for c in codes])
    got = unpack_rows(rows, bits, 37, 32)
    assert got.dtype == np.uint16
    assert np.array_equal(got, np.stack([unpack_codes(r, bits, 37, 32) for r in rows]))
    out = np.empty((3, 37, 32))
    unpack_rows(rows, bits, 37, 32, out=out, msb=True)
    assert np.array_equal(out, codes.astype(np.float64) * 2 ** (16 - bits))


def doc_registers():
    """name -> offset of the shared registers, and field -> offset of the per-engine block, in
    docs/kernel-interface.md section 2's tables."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "kernel-interface.md").read_text()
    table = text[text.index("## 2. Registers"):text.index("## 3.")]
    shared = re.findall(r"^\| (0x[0-9A-Fa-f]+)\S* \| (\w+) \|", table, re.M)
    per_engine = re.findall(r"^\| (0x[0-9A-Fa-f]+) \+ (0x[0-9A-Fa-f]+) e \+ (0x[0-9A-Fa-f]+)\S* \| e\{e\}_(\w+) \|",
                            table, re.M)
    assert {(int(b, 16), int(s, 16)) for b, s, _, _ in per_engine} == {(L.ENGINE_BASE, L.ENGINE_STRIDE)}
    return ({name: int(off, 16) for off, name in shared if int(off, 16) >= 0x10},
            {name: int(off, 16) for _, _, off, name in per_engine})


def test_register_map_contract():
    shared = {n: off for n, (off, _) in L.ARGS.items()}
    offs = list(shared.values()) + [L.STATUS, L.DEBUG, L.ENGINES, L.PCS_PER_ENGINE]
    # shared offsets are unique, 8 bytes apart from 0x10 with no gaps, whatever the dict order
    assert len(set(offs)) == len(offs)
    assert sorted(offs) == list(range(0x10, 0x10 + 8 * len(offs), 8))
    # per-engine blocks follow, one per engine, and never overlap the shared registers or each other
    regs = L.regs(L.MAX_ENGINES)
    assert len(set(regs.values())) == len(regs)
    assert all(off >= L.ENGINE_BASE for n, off in regs.items() if n.startswith("e") and n[1].isdigit())
    assert max(regs.values()) + 4 < 1 << L.CONTROL_ADDR_BITS
    assert L.engine_arg(3, "n_body") in L.regs(4) and L.engine_arg(4, "n_body") not in L.regs(4)
    # and they are the documented ones
    doc_shared, doc_engine = doc_registers()
    named = dict(shared, status=L.STATUS, debug=L.DEBUG, engines=L.ENGINES, pcs_per_engine=L.PCS_PER_ENGINE)
    assert doc_shared == named
    assert doc_engine == {n: off for n, (off, _) in L.ENGINE_ARGS.items()}
    assert L.query_dtype(64).itemsize == 192 and L.partial_dtype(64).itemsize == 576
    assert L.query_dtype(64).itemsize % L.WORD_BYTES == 0 and L.partial_dtype(128).itemsize % L.WORD_BYTES == 0


def test_control_register_semantics():
    dev = GoldenDevice(engines=3)
    assert dev.read_reg(L.CTRL) & L.AP_IDLE
    assert dev.read_reg(L.ENGINES) == 3 and dev.read_reg(L.PCS_PER_ENGINE) == 1
    dev.write_reg(L.ARGS["op"][0], 99)
    dev.write_reg(L.CTRL, L.AP_START)
    assert dev.read_reg(L.CTRL) & L.AP_DONE
    assert not dev.read_reg(L.CTRL) & L.AP_DONE  # clear on read
    assert dev.read_reg(L.STATUS) == L.STATUS_BAD_OP


def test_slices_deal_whole_windows_round_robin():
    from pmkvq_accel.model.cache import Occupancy
    cfg = CacheConfig(1, 64, 1, 16)
    occ = Occupancy(cfg, sink=1, body=5 * 16, window=7)
    assert L.slices(occ, 2) == [(1, 48, 0), (0, 32, 7)]    # blocks 0, 2, 4 | 1, 3; block 5 fills in engine 1
    assert L.slices(occ, 8) == [(1, 16, 0), (0, 16, 0), (0, 16, 0), (0, 16, 0), (0, 16, 0), (0, 0, 7),
                                (0, 0, 0), (0, 0, 0)]   # more engines than blocks: some hold nothing
    assert sum(map(sum, L.slices(occ, 3))) == occ.tokens


@pytest.mark.parametrize("G, engines", [(1, 1), (3, 2), (2, 5)])
def test_fast_path_is_bit_identical_to_golden_model(G, engines):
    """Same host steps on two golden devices: vectorised kernel vs model.attention.attention_partial per head."""
    rng = np.random.default_rng(G)
    cfg = CacheConfig(n_kv_heads=3, head_dim=64, n_sink=1, window=16)
    max_len = 400
    kb, vb = budget_for_width(cfg, 2, max_len), budget_for_width(cfg, 4, max_len)
    fast = DeviceKVCache(GoldenDevice(engines=engines), [cfg], [kb], [vb], max_len, group=G)
    ref = DeviceKVCache(GoldenDevice(reference=True, engines=engines), [cfg], [kb], [vb], max_len, group=G)
    n = 0
    while n < max_len:
        T = int(min(rng.integers(1, 40), max_len - n))
        n += T
        k = rng.normal(size=(3, T, 64)) * rng.uniform(0.01, 10) + rng.normal(size=(1, 1, 64)) * 3
        v = rng.normal(size=(3, T, 64)) + rng.normal()
        fast.append(0, k, v)
        ref.append(0, k, v)
        q = rng.normal(size=(3 * G, 64)) * 3
        out = fast.attention(0, q, 0.125)
        assert np.array_equal(out, ref.attention(0, q, 0.125))
        for a, b in zip(fast.bufs, ref.bufs):
            assert np.array_equal(a.read(0, a.nbytes), b.read(0, b.nbytes))
    assert fast.widths(0) == (2, 4)


def small_cache(engines=2, tokens=20, **dev_kw):
    cfg = CacheConfig(2, 64, 1, 16)
    kv = DeviceKVCache(GoldenDevice(engines=engines, **dev_kw), [cfg], [1e6], [1e6], 64, group=2)
    # 20 tokens: sink in engine 0, window block 0 flushed into engine 0's body, block 1 filling in engine 1
    kv.append(0, np.ones((2, tokens, 64)), np.ones((2, tokens, 64)))
    return kv


def attention_args(kv, **over):
    """The registers of an ATTENTION launch over the cache's slices; per-engine fields as e{e}_<name>."""
    k, v = kv.layers[0].occ
    args = dict(kv.layers[0].args, **kv.bases, op=L.OP_ATTENTION, group=2, k_bits=k.bits, v_bits=v.bits)
    for e, c in enumerate(kv.slices(0)):
        args.update({L.engine_arg(e, f): n for f, n in zip(L.COUNT_FIELDS, c)})
    args.update(over)
    return args


@pytest.mark.parametrize("over, status", [
    (dict(op=7), "BAD_OP"),
    (dict(group=9), "BAD_GROUP"),
    (dict(k_bits=3), "BAD_BITS"),
    (dict(e0_n_sink=0, e0_n_body=0, e1_n_window=0, e1_n_body=0), "BAD_TOKENS"),
    (dict(e1_n_body=70000), "BAD_TOKENS"),
    (dict(n_heads=0), "BAD_TOKENS"),
    (dict(query=100), "BAD_ADDRESS"),
    (dict(e1_base=(1 << 40) + 64), "BAD_ADDRESS"),     # aligned, but outside device memory (golden check)
    (dict(e1_base=(1 << 32) + 8), "BAD_ADDRESS"),
    (dict(k_body_off=100), "BAD_ADDRESS"),
    (dict(op=L.OP_SHRINK, kind=5), "BAD_KIND"),
    (dict(op=L.OP_SHRINK, kind=0, k_bits=2, e0_n_body=8), "BAD_BITS"),
    (dict(op=L.OP_COPY, kind=1, e1_n_window=0), "BAD_TOKENS"),
    (dict(meta_body_off=4), "BAD_ADDRESS"),
])
def test_bad_launches_report_status(over, status):
    kv = small_cache()
    with pytest.raises(DeviceError, match=status):
        kv.kernel.launch(**attention_args(kv, **over))
    kv.kernel.launch(**attention_args(kv))  # the kernel still works afterwards


def test_bad_head_dim_group_and_data():
    kv = small_cache(tokens=3, head_dim=128)  # a kernel synthesised for head_dim 128
    with pytest.raises(DeviceError, match="BAD_HEAD_DIM"):
        kv.attention(0, np.ones((4, 64)), 0.125)
    with pytest.raises(DeviceError, match="refused COPY: status 2 .BAD_HEAD_DIM"):
        kv.append(0, np.ones((2, 20, 64)), np.ones((2, 20, 64)))   # the window flush
    kv = small_cache(group=3)  # a kernel synthesised for G = 3
    with pytest.raises(DeviceError, match="BAD_GROUP"):
        kv.attention(0, np.ones((4, 64)), 0.125)
    kv = small_cache()
    kv.bufs[1].write(kv.layers[0].offs["v_meta"] + kv.layers[0].geo.meta_window_off,
                     np.array([0x7F80], "<u4"))  # engine 1's first window token: scale = +Inf
    with pytest.raises(DeviceError, match="BAD_DATA"):
        kv.attention(0, np.ones((4, 64)), 0.125)


def test_no_register_outside_the_kernel():
    kv = small_cache(engines=2)
    with pytest.raises(ValueError, match="no register 'e2_n_body' in a 2-engine kernel"):
        kv.kernel.launch(**attention_args(kv, e2_n_body=5))


def test_addresses_above_4gib_and_register_reuse():
    kv = small_cache()
    assert all(a >= 1 << 32 for a in kv.bases.values())  # the high address word is used
    kv.attention(0, np.ones((4, 64)), 0.125)
    writes = []
    dev = kv.device
    orig = dev.write_reg
    dev.write_reg = lambda off, val: (writes.append(off), orig(off, val))
    kv.append(0, np.ones((2, 1, 64)), np.ones((2, 1, 64)))
    kv.attention(0, np.ones((4, 64)), 0.125)
    # only the register that changed (engine 1's window count), then ap_start
    assert writes == [L.regs(2)[L.engine_arg(1, "n_window")], L.CTRL]


def test_kernel_timeout_is_an_error():
    class Stuck(GoldenDevice):
        def read_reg(self, offset):
            return 0 if offset == L.CTRL else super().read_reg(offset)
    k = Kernel(Stuck(), timeout_s=0.05)
    with pytest.raises(DeviceError, match="did not finish"):
        k.launch(op=L.OP_ATTENTION)
