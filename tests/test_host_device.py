"""Backends: unknown boards, the not-yet-available sim backend, and the u280 path without PYNQ, XRT, a board or
an .xclbin all fail with clear messages. Real-hardware tests carry the `board` marker (run: pytest -m board,
with PMKVQ_XCLBIN pointing at the bitstream) and skip themselves where no U280 is present."""
import os
import sys

import numpy as np
import pytest

from pmkvq_accel.host.device import DeviceUnavailable, GoldenDevice, U280Device, open_device
from pmkvq_accel.host.kvcache import DeviceKVCache
from pmkvq_accel.model.cache import CacheConfig, budget_for_width


def test_unknown_board():
    with pytest.raises(ValueError, match="unknown board 'vcu118': choose one of golden, sim, u280"):
        open_device("vcu118")


def test_golden_is_default():
    assert isinstance(open_device(), GoldenDevice)


def test_sim_not_yet_available():
    with pytest.raises(DeviceUnavailable, match="not yet available"):
        open_device("sim")


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
    rng = np.random.default_rng(0)
    cfg = CacheConfig(3, 64, 1, 128)
    b = budget_for_width(cfg, 4, 1024)
    caches = [DeviceKVCache(d, [cfg], [b], [b], 1024, group=3) for d in (u280, GoldenDevice())]
    for T in (300, 1, 1, 500, 1):
        k, v = rng.normal(size=(3, T, 64)), rng.normal(size=(3, T, 64))
        q = rng.normal(size=(9, 64))
        outs = []
        for kv in caches:
            kv.append(0, k, v)
            outs.append(kv.attention(0, q, 0.125))
        assert np.array_equal(outs[0], outs[1])
