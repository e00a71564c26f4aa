"""Backends: unknown boards, opening the sim backend, and the u280 path without PYNQ, XRT, a board or
an .xclbin all fail with clear messages. Real-hardware tests carry the `board` marker (run: pytest -m board,
with PMKVQ_XCLBIN pointing at the bitstream) and skip themselves where no U280 is present."""
import os
import sys

import numpy as np
import pytest

from pmkvq_accel.host.device import DeviceUnavailable, GoldenDevice, U280Device, open_device
from pmkvq_accel.host.kvcache import DeviceKVCache
from pmkvq_accel.model.cache import CacheConfig, budget_for_width

from device_compare import assert_same_cache_results


def test_unknown_board():
    with pytest.raises(ValueError, match="unknown board 'vcu118': choose one of golden, sim, u280"):
        open_device("vcu118")


def test_golden_is_default():
    assert isinstance(open_device(), GoldenDevice)


def test_sim_opens_without_building():
    """The simulator is built only once the model's head_dim and G are known (tests/test_host_sim.py)."""
    dev = open_device("sim")
    assert dev.name == "sim" and dev.sim is None and dev.cycles() is None


def test_u280_without_pynq(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynq", None)  # import pynq -> ImportError
    with pytest.raises(DeviceUnavailable, match="needs PYNQ 3.0.1"):
        open_device("u280", xclbin="whatever.xclbin")


def test_u280_missing_xclbin(tmp_path, monkeypatch):
    monkeypatch.delenv("PMKVQ_XCLBIN", raising=False)
    missing = tmp_path / "nope.xclbin"
    with pytest.raises(DeviceUnavailable, match=f"{missing} does not exist"):
        open_device("u280", xclbin=missing)


def test_u280_without_board(tmp_path):
    pytest.importorskip("pynq")
    fake = tmp_path / "k.xclbin"
    fake.write_bytes(b"xclbin2\0")
    try:
        import pynq
        has_board = bool(pynq.Device.devices)
    except Exception:
        has_board = False
    if has_board:
        pytest.skip("a real board is present")
    with pytest.raises(DeviceUnavailable, match="no Alveo board found|XRT is not usable"):
        open_device("u280", xclbin=fake)


@pytest.fixture
def u280():
    try:
        dev = U280Device(os.environ.get("PMKVQ_XCLBIN"))
    except DeviceUnavailable as e:
        pytest.skip(str(e))
    yield dev
    dev.close()


@pytest.mark.board
def test_u280_matches_golden(u280):
    """The same host steps on the board and on the golden device give identical partial results."""
    assert_same_cache_results(u280, GoldenDevice())


class FakePynqBuffer(np.ndarray):
    """Host side of a PYNQ buffer: slices keep their device_address/offset; sync copies to/from the device."""

    def __array_finalize__(self, obj):
        if obj is None or not hasattr(obj, "dev"):
            return
        off = self.__array_interface__["data"][0] - obj.__array_interface__["data"][0]
        self.dev, self.offset, self.device_address = obj.dev, obj.offset + off, obj.device_address + off

    def sync_to_device(self):
        self.dev.array[self.offset:self.offset + self.nbytes] = np.asarray(self).reshape(-1)

    def sync_from_device(self):
        np.asarray(self).reshape(-1)[:] = self.dev.array[self.offset:self.offset + self.nbytes]


def fake_pynq(board: GoldenDevice):
    """A stand-in for pynq 3.0.1 whose 'board' is a golden device: registers and device memory are separate
    from the host buffers, so data only reaches the kernel through sync_to_device."""
    import types
    m = types.ModuleType("pynq")
    m.Device = types.SimpleNamespace(devices=[object()])

    class IP:
        def write(self, off, value):
            board.write_reg(off, value)

        def read(self, off):
            return board.read_reg(off)

    class Overlay:
        def __init__(self, path):
            self.pmkvq_attn_1 = IP()
            for i in range(32):
                setattr(self, f"HBM{i}", f"HBM{i}")

        def free(self):
            pass

    def allocate(shape, dtype, target=None):
        dev = board.mem.allocate(shape[0])
        buf = np.zeros(shape, dtype).view(FakePynqBuffer)
        buf.dev, buf.offset, buf.device_address = dev, 0, dev.address
        return buf
    m.Overlay, m.allocate = Overlay, allocate
    return m


def test_u280_host_path_against_a_pynq_stand_in(tmp_path, monkeypatch):
    """The u280 backend's PYNQ calls (allocate in HBM, slice writes + sync_to_device, MMIO registers,
    sync_from_device) drive a kernel exactly like the golden backend does."""
    xclbin = tmp_path / "k.xclbin"
    xclbin.write_bytes(b"xclbin2\0")
    monkeypatch.setitem(sys.modules, "pynq", fake_pynq(GoldenDevice()))
    u280 = open_device("u280", xclbin=xclbin)
    assert isinstance(u280, U280Device)
    rng = np.random.default_rng(1)
    cfg = CacheConfig(3, 64, 1, 16)
    b = budget_for_width(cfg, 2, 300)
    caches = [DeviceKVCache(d, [cfg, cfg], [b, b], [b, b], 300, group=3) for d in (u280, GoldenDevice())]
    for T in (40, 1, 1, 100, 1, 120, 1):
        k, v, q = rng.normal(size=(3, T, 64)), rng.normal(size=(3, T, 64)), rng.normal(size=(9, 64))
        outs = []
        for kv in caches:
            for layer in (0, 1):
                kv.append(layer, k, v)
            outs.append(kv.attention(1, q, 0.125))
        assert np.array_equal(outs[0], outs[1])
    assert caches[0].widths(1) == caches[1].widths(1) == (2, 2)
    u280.close()
