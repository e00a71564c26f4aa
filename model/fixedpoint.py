"""Bit-level primitives shared by every part of the golden model (docs/numerics.md section 1).

bf16 values are carried as their uint16 bit patterns, exactly as they sit in device memory.
All functions are vectorised over NumPy arrays.
"""
from __future__ import annotations

import numpy as np

from .formats import BF16_EXP_BIAS, BF16_SUBNORMAL_EXP

BF16_MAX = float.fromhex("0x1.fep127")


def check_finite(name: str, x: np.ndarray) -> None:
    if not np.all(np.isfinite(x)):
        bad = "NaN" if np.any(np.isnan(x)) else "Inf"
        raise ValueError(f"{name} contains {bad}; only finite values can be quantized")


def bf16_round(x) -> np.ndarray:
    """Round float64 values to the nearest bfloat16 value (ties to even), returned as float64.

    Subnormal bf16 values are kept (fixed quantum 2^-133). |x| beyond the bf16 range is an error.
    """
    x = np.asarray(x, dtype=np.float64)
    check_finite("value to round to bf16", x)
    _, e = np.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1
    e = np.maximum(e, -125)  # below 2^-126 the quantum is fixed: bf16 subnormals
    y = np.ldexp(np.rint(np.ldexp(x, 8 - e)), e - 8)  # 8 significant bits, rint = ties-to-even
    if np.any(np.abs(y) > BF16_MAX):
        raise ValueError("value exceeds the bfloat16 range (|x| > 3.39e38)")
    return y


def bf16_bits(x) -> np.ndarray:
    """float64 values that are exact bf16 values -> uint16 bit patterns."""
    f = np.asarray(x, dtype=np.float64).astype(np.float32)
    return (f.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def bf16_value(bits) -> np.ndarray:
    """uint16 bit patterns -> float64 values."""
    b = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return b.view(np.float32).astype(np.float64)


def _bf16_field_tables() -> tuple[np.ndarray, np.ndarray]:
    b = np.arange(1 << 16, dtype=np.int64)
    exp_field, frac = (b >> 7) & 0xFF, b & 0x7F
    normal = exp_field != 0
    mant = np.where(normal, frac + 128, frac)
    return np.where(b >> 15 != 0, -mant, mant), np.where(normal, exp_field - BF16_EXP_BIAS, BF16_SUBNORMAL_EXP)


_BF16_MANT, _BF16_EXP = _bf16_field_tables()


def bf16_fields(bits) -> tuple[np.ndarray, np.ndarray]:
    """Split bf16 bit patterns into (signed integer mantissa m, exponent x) with value = m * 2^x.

    Normal numbers: m = +-(128 + fraction), x = exponent_field - BF16_EXP_BIAS (134). Subnormals and zero:
    m = +-fraction, x = BF16_SUBNORMAL_EXP (-133). Inf/NaN patterns are rejected (they never reach the device).
    """
    b = np.asarray(bits, dtype=np.uint16)
    if np.any((b & 0x7F80) == 0x7F80):
        raise ValueError("bf16 Inf/NaN pattern in scale/zero data")
    return _BF16_MANT[b], _BF16_EXP[b]


def shift_round(x: np.ndarray, k) -> np.ndarray:
    """x * 2^-k rounded half up (toward +inf): floor((x + 2^(k-1)) / 2^k) for k > 0; x << -k for k <= 0.

    This is an arithmetic right shift with a rounding constant, what the hardware builds.
    x must be int64 with |x| < 2^61; left shifts must not overflow int64 (callers saturate).
    """
    x = np.asarray(x, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    if k.min() > 0:  # the common case: right shifts only
        # floor((x + 2^(k-1)) / 2^k) == (floor(x / 2^(k-1)) + 1) >> 1, in place
        y = np.right_shift(x, np.minimum(k, 62) - 1)
        y += 1
        y >>= 1
        return y
    if k.max() <= 0:
        return np.broadcast_to(x << np.minimum(-k, 62), np.broadcast(x, k).shape).copy()
    kr = np.clip(k, 1, 62)
    return np.where(k > 0, (x + (np.int64(1) << (kr - 1))) >> kr, x << np.clip(-k, 0, 62))


def shift_round_saturate(x: np.ndarray, k, limit_bits: int) -> np.ndarray:
    """shift_round(x, k), saturated to the symmetric range +-(2^limit_bits - 1).

    Left shifts that would leave the range saturate instead of wrapping.
    """
    x = np.asarray(x, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    lim = (np.int64(1) << limit_bits) - 1
    if k.min() > 0:
        y = shift_round(x, k)
        np.minimum(y, lim, out=y)
        np.maximum(y, -lim, out=y)
        return y
    ls = np.clip(-k, 0, 62)
    # |x| << ls overflows the limit exactly when |x| > lim >> ls.
    overflow = (k < 0) & (np.abs(x) > (lim >> ls))
    y = np.clip(shift_round(np.where(overflow, 0, x), k), -lim, lim)
    return np.where(overflow, np.sign(x) * lim, y)
