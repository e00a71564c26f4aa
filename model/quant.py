"""KV quantizer, code packing and progressive shrink (docs/numerics.md sections 2-3).

A quantized block of tokens is a `QuantizedKV`: integer codes (tokens, head_dim) of one width plus
the per-token bf16 scale and zero as uint16 bit patterns. Dequantised value: x^ = q * s - z.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fixedpoint import bf16_bits, bf16_round, bf16_value, check_finite
from .formats import SCALE_MAX, SCALE_MIN, check_bits


@dataclass(frozen=True)
class QuantizedKV:
    codes: np.ndarray    # (tokens, head_dim) uint16, each < 2^bits
    scale: np.ndarray    # (tokens,) uint16 bf16 bit patterns, s > 0
    zero: np.ndarray     # (tokens,) uint16 bf16 bit patterns, z = -min
    bits: int

    def __post_init__(self):
        check_bits(self.bits)
        if self.codes.ndim != 2:
            raise ValueError(f"codes must be (tokens, head_dim), got shape {self.codes.shape}")
        t = self.codes.shape[0]
        if self.scale.shape != (t,) or self.zero.shape != (t,):
            raise ValueError(f"scale/zero must have shape ({t},), got {self.scale.shape} and {self.zero.shape}")

    @property
    def tokens(self) -> int:
        return self.codes.shape[0]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[1]


def quantize(x, bits: int) -> QuantizedKV:
    """Per-token asymmetric quantization of x (tokens, head_dim), one group per token and head.

    s = bf16(clamp((max - min) / (2^b - 1), 1e-5, 1e5)), z = bf16(-min),
    q = clamp(round_half_even((x + z) / s), 0, 2^b - 1), all in float64 from the given values.
    """
    check_bits(bits)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"quantize expects a non-empty (tokens, head_dim) array, got shape {x.shape}")
    check_finite("KV input", x)
    lo, hi = x.min(axis=1), x.max(axis=1)
    qmax = (1 << bits) - 1
    s = bf16_round(np.clip((hi - lo) / qmax, SCALE_MIN, SCALE_MAX))
    z = bf16_round(-lo)
    q = np.clip(np.rint((x + z[:, None]) / s[:, None]), 0, qmax).astype(np.uint16)
    return QuantizedKV(q, bf16_bits(s), bf16_bits(z), bits)


def dequantize(kv: QuantizedKV) -> np.ndarray:
    """x^ = q * s - z in float64 (the values the reference attention uses)."""
    s, z = bf16_value(kv.scale), bf16_value(kv.zero)
    return kv.codes.astype(np.float64) * s[:, None] - z[:, None]


def shrink_codes(q, n: int) -> np.ndarray:
    """PM-KVQ integer shrink of codes of width 2n to width n:
    q' = ((q << 2n) - (q << n) + q + 2^(3n-1) - 2^(2n-1) + 2^(n-1)) >> 3n, masked to n bits."""
    check_bits(n, "target width")
    if n == 16:
        raise ValueError("cannot shrink to 16 bits: 16 is the widest code")
    q = np.asarray(q).astype(np.int64)
    if q.size and (q.min() < 0 or q.max() >= 1 << (2 * n)):
        raise ValueError(f"codes out of range for width {2 * n}")
    bias = (1 << (3 * n - 1)) - (1 << (2 * n - 1)) + (1 << (n - 1))
    out = (((q << (2 * n)) - (q << n) + q + bias) >> (3 * n)) & ((1 << n) - 1)
    return out.astype(np.uint16)


def shrink_scale(scale_bits, n: int) -> np.ndarray:
    """s' = bf16_rne(s * (2^n + 1)); the product is exact in float64."""
    s = bf16_value(scale_bits)
    return bf16_bits(bf16_round(s * ((1 << n) + 1)))


def shrink(kv: QuantizedKV) -> QuantizedKV:
    """Halve the width of a block: 2n -> n codes, s' = bf16(s * (2^n + 1)), z unchanged."""
    if kv.bits == 2:
        raise ValueError("cannot shrink below 2 bits")
    n = kv.bits // 2
    return QuantizedKV(shrink_codes(kv.codes, n), shrink_scale(kv.scale, n), kv.zero.copy(), n)


def shrink_to(kv: QuantizedKV, bits: int) -> QuantizedKV:
    """Shrink repeatedly (16 -> 8 -> 4 -> 2) down to `bits`, as the device does."""
    check_bits(bits)
    if bits > kv.bits:
        raise ValueError(f"cannot widen codes from {kv.bits} to {bits} bits")
    while kv.bits > bits:
        kv = shrink(kv)
    return kv


def pack_codes(codes, bits: int, word_bits: int = 512) -> np.ndarray:
    """Pack codes (tokens, head_dim) into little-endian memory words.

    The block is one bit stream: code k (row-major index t * head_dim + d) occupies stream bits
    [k*b, (k+1)*b), LSB first; stream bit i is bit (i % 8) of byte i // 8. The stream is padded with
    zero bits to a whole number of words. Returns uint8 bytes (length = words * word_bits / 8).
    """
    check_bits(bits)
    _check_word_bits(word_bits)
    codes = np.asarray(codes)
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"code value {int(codes.max())} does not fit in {bits} bits")
    flat = codes.reshape(-1).astype(np.uint16)
    per_byte = 8 // bits if bits < 8 else 0
    if bits == 16:
        raw = flat.astype("<u2").view(np.uint8)
    elif bits == 8:
        raw = flat.astype(np.uint8)
    else:
        flat = np.concatenate([flat, np.zeros((-flat.size) % per_byte, np.uint16)])
        groups = flat.reshape(-1, per_byte).astype(np.uint8)
        shifts = (np.arange(per_byte) * bits).astype(np.uint8)
        raw = np.bitwise_or.reduce(groups << shifts, axis=1).astype(np.uint8)
    word_bytes = word_bits // 8
    return np.concatenate([raw, np.zeros((-raw.size) % word_bytes, np.uint8)])


def _lut(bits: int) -> np.ndarray:
    """256 x (8 / bits) table: the codes held by each byte value, LSB first."""
    per = 8 // bits
    b = np.arange(256, dtype=np.uint16)[:, None]
    return (b >> (np.arange(per, dtype=np.uint16) * bits)) & ((1 << bits) - 1)


_LUTS = {b: _lut(b) for b in (4, 2)}
_LUTS_F64 = {(b, msb): _LUTS[b] * float(1 << (16 - b) if msb else 1) for b in (4, 2) for msb in (False, True)}


def unpack_rows(rows: np.ndarray, bits: int, tokens: int, head_dim: int, out=None, msb: bool = False):
    """THE unpacker (inverse of pack_codes), for H blocks at once: packed rows (H, >= bytes of the block) uint8
    -> codes (H, tokens, head_dim). Returns uint16 codes, or writes them into the float64 array `out`
    (MSB-aligned to 16 bits, c << (16 - bits), if msb). Byte-wise table lookup for 4 and 2 bits."""
    n = tokens * head_dim
    h = rows.shape[0]
    if bits == 16:  # each row is contiguous, so it can be reinterpreted in place
        codes = rows[:, :2 * n].view("<u2").reshape(h, tokens, head_dim)
    elif bits == 8:
        codes = rows[:, :n].reshape(h, tokens, head_dim)
    else:
        per = 8 // bits
        lut = _LUTS[bits] if out is None else _LUTS_F64[bits, msb]
        codes = lut[rows[:, :-(-n // per)]].reshape(h, -1)[:, :n].reshape(h, tokens, head_dim)
        if out is not None:
            out[...] = codes
            return out
    if out is None:
        return codes.astype(np.uint16)
    np.multiply(codes, float(1 << (16 - bits)) if msb else 1.0, out=out)
    return out


def unpack_codes(data, bits: int, tokens: int, head_dim: int) -> np.ndarray:
    """Inverse of pack_codes: bytes -> codes (tokens, head_dim) uint16 (one block: unpack_rows of one row)."""
    check_bits(bits)
    data = np.asarray(data, dtype=np.uint8)
    n = tokens * head_dim
    if data.size * 8 < n * bits:
        raise ValueError(f"{data.size} bytes hold fewer than {n} codes of {bits} bits")
    return unpack_rows(data.reshape(1, -1), bits, tokens, head_dim)[0]


def pack_metadata(scale_bits, zero_bits) -> np.ndarray:
    """Per-token metadata words: uint32 = scale_bf16 | zero_bf16 << 16 (little endian in memory)."""
    return np.asarray(scale_bits, np.uint32) | (np.asarray(zero_bits, np.uint32) << np.uint32(16))


def unpack_metadata(words) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(words, dtype=np.uint32)
    return (w & 0xFFFF).astype(np.uint16), (w >> 16).astype(np.uint16)


def _check_word_bits(word_bits: int) -> None:
    if word_bits not in (64, 128, 256, 512):
        raise ValueError(f"unsupported memory word width {word_bits}: use 64, 128, 256 or 512 bits")
