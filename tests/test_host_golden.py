"""The golden backend executes the kernel contract (docs/kernel-interface.md) from registers and device memory:
its fast path is bit-identical to the golden model itself, and bad launches come back as status codes."""
import numpy as np
import pytest

from pmkvq_accel.host import layout as L
from pmkvq_accel.host.device import DeviceError, GoldenDevice, Kernel
from pmkvq_accel.host.golden import unpack_rows
from pmkvq_accel.host.kvcache import DeviceKVCache
from pmkvq_accel.model.cache import CacheConfig, budget_for_width
from pmkvq_accel.model.quant import pack_codes, unpack_codes


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
    """name -> offset of the argument/status registers in docs/kernel-interface.md section 2's table."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "kernel-interface.md").read_text()
    table = text[text.index("## 2. Registers"):text.index("## 3.")]
    rows = re.findall(r"^\| (0x[0-9A-Fa-f]+)\S* \| (\w+) \|", table, re.M)
    return {name: int(off, 16) for off, name in rows if int(off, 16) >= 0x10}


def test_register_map_contract():
    offs = list(L.REGS.values())
    # offsets are unique, 8 bytes apart from 0x10 with no gaps (status included), whatever the dict order
    assert len(set(offs)) == len(offs) and "status" in L.REGS
    assert sorted(offs) == list(range(0x10, 0x10 + 8 * len(offs), 8))
    # and they are the documented ones (the host's copy of the contract against the interface document)
    doc = doc_registers()
    assert {n: doc.get(n) for n in L.REGS} == L.REGS
    assert set(doc) - set(L.REGS) <= {"debug"}, set(doc) - set(L.REGS)
    assert L.query_dtype(64).itemsize == 192 and L.partial_dtype(64).itemsize == 576
    assert L.query_dtype(64).itemsize % L.WORD_BYTES == 0 and L.partial_dtype(128).itemsize % L.WORD_BYTES == 0


def test_control_register_semantics():
    dev = GoldenDevice()
    assert dev.read_reg(L.CTRL) & L.AP_IDLE
    dev.write_reg(L.REGS["op"], 99)
    dev.write_reg(L.CTRL, L.AP_START)
    assert dev.read_reg(L.CTRL) & L.AP_DONE
    assert not dev.read_reg(L.CTRL) & L.AP_DONE  # clear on read
    assert dev.read_reg(L.REGS["status"]) == 1


@pytest.mark.parametrize("G", [1, 3])
def test_fast_path_is_bit_identical_to_golden_model(G):
    """Same host steps on two golden devices: vectorised kernel vs model.attention.attention_partial per head."""
    rng = np.random.default_rng(G)
    cfg = CacheConfig(n_kv_heads=3, head_dim=64, n_sink=1, window=16)
    max_len = 400
    kb, vb = budget_for_width(cfg, 2, max_len), budget_for_width(cfg, 4, max_len)
    fast = DeviceKVCache(GoldenDevice(), [cfg], [kb], [vb], max_len, group=G)
    ref = DeviceKVCache(GoldenDevice(reference=True), [cfg], [kb], [vb], max_len, group=G)
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
        nb = fast.partial_buf.nbytes
        assert np.array_equal(fast.partial_buf.read(0, nb), ref.partial_buf.read(0, nb))
    assert fast.widths(0) == (2, 4)


def small_cache(**dev_kw):
    cfg = CacheConfig(2, 64, 1, 16)
    kv = DeviceKVCache(GoldenDevice(**dev_kw), [cfg], [1e6], [1e6], 64, group=2)
    kv.append(0, np.ones((2, 3, 64)), np.ones((2, 3, 64)))
    return kv


def attention_args(kv, **over):
    k, v = kv.layers[0].occ
    args = dict(kv.layers[0].args, op=L.OP_ATTENTION, group=2, n_sink=k.sink, n_body=k.body, n_window=k.window,
                k_bits=k.bits, v_bits=v.bits, query=kv.query_buf.address, partial=kv.partial_buf.address)
    args.update(over)
    return args


@pytest.mark.parametrize("over, status", [
    (dict(op=7), "BAD_OP"),
    (dict(group=9), "BAD_GROUP"),
    (dict(k_bits=3), "BAD_BITS"),
    (dict(n_sink=0, n_body=0, n_window=0), "BAD_TOKENS"),
    (dict(n_body=70000), "BAD_TOKENS"),
    (dict(query=1 << 20), "BAD_ADDRESS"),
    (dict(k_body_off=100), "BAD_ADDRESS"),
    (dict(op=L.OP_SHRINK, kind=5), "BAD_KIND"),
    (dict(op=L.OP_SHRINK, kind=0, k_bits=2, n_body=8), "BAD_BITS"),
    (dict(op=L.OP_COPY, kind=1, n_window=0), "BAD_TOKENS"),
    (dict(meta_body_off=4), "BAD_ADDRESS"),
])
def test_bad_launches_report_status(over, status):
    kv = small_cache()
    with pytest.raises(DeviceError, match=status):
        kv.kernel.launch(**attention_args(kv, **over))
    kv.kernel.launch(**attention_args(kv))  # the kernel still works afterwards


def test_bad_head_dim_group_and_data():
    kv = small_cache(head_dim=128)  # a kernel synthesised for head_dim 128
    with pytest.raises(DeviceError, match="BAD_HEAD_DIM"):
        kv.attention(0, np.ones((4, 64)), 0.125)
    kv = small_cache(group=3)  # a kernel synthesised for G = 3
    with pytest.raises(DeviceError, match="BAD_GROUP"):
        kv.attention(0, np.ones((4, 64)), 0.125)
    kv = small_cache()
    kv.layers[0].buf.write(kv.layers[0].offs["v_meta"], np.array([0x7F80], "<u4"))  # scale = +Inf
    with pytest.raises(DeviceError, match="BAD_DATA"):
        kv.attention(0, np.ones((4, 64)), 0.125)


def test_addresses_above_4gib_and_register_reuse():
    kv = small_cache()
    assert kv.layers[0].args["k_codes"] >= 1 << 32  # the high address word is used
    kv.attention(0, np.ones((4, 64)), 0.125)
    writes = []
    dev = kv.device
    orig = dev.write_reg
    dev.write_reg = lambda off, val: (writes.append(off), orig(off, val))
    kv.append(0, np.ones((2, 1, 64)), np.ones((2, 1, 64)))
    kv.attention(0, np.ones((4, 64)), 0.125)
    assert writes == [L.REGS["n_window"], L.CTRL]  # only the register that changed, then ap_start


def test_kernel_timeout_is_an_error():
    class Stuck(GoldenDevice):
        def read_reg(self, offset):
            return 0 if offset == L.CTRL else super().read_reg(offset)
    k = Kernel(Stuck(), timeout_s=0.05)
    with pytest.raises(DeviceError, match="did not finish"):
        k.launch(op=L.OP_ATTENTION)


def test_host_contract_matches_hardware_regmap():
    """host/layout.py and the kernel RTL's hw/regmap.py describe the same registers, ops and records."""
    R = pytest.importorskip("pmkvq_accel.hw.regmap")
    assert R.KERNEL_NAME == L.KERNEL_NAME and R.WORD_BITS == L.WORD_BITS
    assert {n: off for n, (off, _) in R.ARGS.items()} == {n: L.REGS[n] for n in L.ARG_REGS}
    assert set(R.ADDRESS_ARGS) == set(L.ADDRESS_REGS) and R.STATUS == L.REGS["status"]
    assert (R.OP_ATTENTION, R.OP_SHRINK, R.OP_COPY) == (L.OP_ATTENTION, L.OP_SHRINK, L.OP_COPY)
    assert (R.KIND_KEYS, R.KIND_VALUES) == (L.KIND_KEYS, L.KIND_VALUES)
    for code, name in R.STATUS_NAMES.items():
        assert L.STATUS_NAMES[code].split(":")[0] == name.split(":")[0]
    for hd in (32, 64, 128):
        assert R.query_record_bytes(hd) == L.query_dtype(hd).itemsize
        assert R.partial_record_bytes(hd) == L.partial_dtype(hd).itemsize
