"""The PM-KVQ progressive KV cache semantics, as a reusable reference (used by the host runtime's cache
manager and the calibration evaluation).

Per layer and per tensor kind (keys or values, each with its own byte budget), for all KV heads at once:
- the first `n_sink` tokens stay at 16 bits for ever (attention sinks);
- the most recent tokens sit in a 16-bit window of `window` tokens; when a token arrives and the window is
  full, the whole window moves into the body, brought down to the body's current width by integer shrink;
- the body starts at `body_init_bits`; whenever the stored bytes exceed the budget, the WHOLE body is
  shrunk to half its width (16 -> 8 -> 4 -> 2), as many times as needed; if 2 bits do not fit, BudgetError.
Memory is accounted both ways: codes only (as the paper) and codes plus the bf16 scale/zero of every token;
`count_metadata` chooses which one the budget is charged with (default: the honest one, with metadata).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .formats import check_bits
from .quant import QuantizedKV, dequantize, quantize, shrink, shrink_to

METADATA_BYTES_PER_TOKEN_HEAD = 4  # bf16 scale + bf16 zero


class BudgetError(MemoryError):
    """The budget cannot hold the cache even with the body at 2 bits."""


@dataclass(frozen=True)
class CacheConfig:
    n_kv_heads: int
    head_dim: int
    n_sink: int = 1
    window: int = 128
    body_init_bits: int = 16
    count_metadata: bool = True

    def __post_init__(self):
        if self.n_kv_heads < 1 or self.head_dim < 1:
            raise ValueError("n_kv_heads and head_dim must be positive")
        if self.n_sink < 0 or self.window < 1:
            raise ValueError("n_sink must be >= 0 and window >= 1")
        check_bits(self.body_init_bits, "initial body width")

    def token_bytes(self, bits: int, metadata: bool | None = None) -> float:
        """Bytes one token of one tensor kind (K or V) takes over all KV heads."""
        metadata = self.count_metadata if metadata is None else metadata
        b = self.n_kv_heads * self.head_dim * bits / 8
        return b + (self.n_kv_heads * METADATA_BYTES_PER_TOKEN_HEAD if metadata else 0)


@dataclass
class Occupancy:
    """Token counts and body width of one store: all that memory accounting needs."""
    cfg: CacheConfig
    sink: int = 0
    body: int = 0
    window: int = 0
    bits: int = 0

    def __post_init__(self):
        self.bits = self.bits or self.cfg.body_init_bits

    @property
    def tokens(self) -> int:
        return self.sink + self.body + self.window

    def bytes(self, metadata: bool | None = None, window: int | None = None) -> float:
        w = self.window if window is None else window
        return (self.sink + w) * self.cfg.token_bytes(16, metadata) + self.body * self.cfg.token_bytes(self.bits, metadata)

    def first_overflow(self, budget: float) -> int | None:
        """Smallest window fill (<= current) at which the bytes exceed the budget, or None."""
        if self.bytes() <= budget:
            return None
        per = self.cfg.token_bytes(16)
        base = self.bytes(window=0)
        if base > budget:
            return 0
        return min(self.window, int((budget - base) // per) + 1)


def budget_for_width(cfg: CacheConfig, bits: int, max_len: int, metadata: bool | None = None) -> float:
    """The smallest budget that holds every length up to max_len with the body at `bits`.

    Bytes peak either at max_len or just before the last window flush (sink and a full window at
    16 bits, max_len - w tokens where w is the window fill at max_len)."""
    check_bits(bits)
    if max_len < 1:
        raise ValueError("max_len must be positive")
    t16, tb = cfg.token_bytes(16, metadata), cfg.token_bytes(bits, metadata)
    if max_len <= cfg.n_sink + cfg.window:
        return max_len * t16
    w = (max_len - cfg.n_sink - 1) % cfg.window + 1
    body = max_len - cfg.n_sink - w
    at_end = (cfg.n_sink + w) * t16 + body * tb
    before_flush = (cfg.n_sink + cfg.window) * t16 + (body - cfg.window) * tb
    return max(at_end, before_flush)


def shrink_schedule(cfg: CacheConfig, budget: float, max_len: int) -> list[tuple[int, int]]:
    """[(tokens, bits)]: the token count at which the body shrinks to `bits`, up to max_len tokens.
    Raises BudgetError if the budget cannot hold max_len tokens."""
    occ, events = Occupancy(cfg), []
    pos = 0
    while pos < max_len:
        pos = advance(occ, max_len - pos, budget, events) + pos
    return events


def advance(occ: Occupancy, n: int, budget: float, events: list, on_flush=None, on_shrink=None) -> int:
    """Add up to n tokens to the accounting (one window fill at most); return how many were added.

    The one place the progressive decisions are made: `on_flush` runs before a full window joins the
    body, `on_shrink` after the body width halves. ProgressiveStore and the host's device cache manager
    hang their data movement on these hooks, so they follow exactly the same schedule."""
    cfg = occ.cfg
    if occ.sink < cfg.n_sink:
        take = min(n, cfg.n_sink - occ.sink)
        occ.sink += take
        _enforce(occ, budget, events, on_shrink)
        return take
    if occ.window == cfg.window:
        if on_flush:
            on_flush()
        occ.body += occ.window
        occ.window = 0
    take = min(n, cfg.window - occ.window)
    occ.window += take
    _enforce(occ, budget, events, on_shrink)
    return take


def _enforce(occ: Occupancy, budget: float, events: list, on_shrink=None) -> None:
    while (w := occ.first_overflow(budget)) is not None:
        at = occ.sink + occ.body + w
        if occ.body == 0 or occ.bits == 2:
            raise BudgetError(
                f"budget of {budget:.0f} bytes is too small: {at} tokens need {occ.bytes(window=w):.0f} bytes "
                f"with the body at {occ.bits} bits (sink {occ.sink} and window {w} tokens stay at 16 bits)")
        occ.bits //= 2
        events.append((at, occ.bits))
        if on_shrink:
            on_shrink()


@dataclass
class ProgressiveStore:
    """One tensor kind (keys or values) of one layer, every KV head, with its byte budget."""
    cfg: CacheConfig
    budget: float
    occ: Occupancy = field(init=False)
    events: list = field(init=False, default_factory=list)

    def __post_init__(self):
        if not np.isfinite(self.budget) or self.budget <= 0:
            raise ValueError(f"budget must be a positive number of bytes, got {self.budget}")
        self.occ = Occupancy(self.cfg)
        h = self.cfg.n_kv_heads
        self._sink = [None] * h
        self._body = [None] * h
        self._window = [None] * h

    @property
    def body_bits(self) -> int:
        return self.occ.bits

    @property
    def tokens(self) -> int:
        return self.occ.tokens

    def memory_bytes(self, metadata: bool) -> float:
        return self.occ.bytes(metadata)

    def append(self, x) -> None:
        """Append tokens x (n_kv_heads, T, head_dim) in float: quantized at 16 bits, then placed."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 3 or x.shape[0] != self.cfg.n_kv_heads or x.shape[2] != self.cfg.head_dim:
            raise ValueError(f"expected (n_kv_heads={self.cfg.n_kv_heads}, T, head_dim={self.cfg.head_dim}), "
                             f"got {x.shape}")
        blocks = [quantize(x[h], 16) for h in range(self.cfg.n_kv_heads)] if x.shape[1] else []
        pos = 0
        while pos < x.shape[1]:
            into_sink = self.occ.sink < self.cfg.n_sink
            taken = advance(self.occ, x.shape[1] - pos, self.budget, self.events,
                             on_flush=self._flush, on_shrink=self._shrink_body)
            part = [_slice(b, pos, pos + taken) for b in blocks]
            target = self._sink if into_sink else self._window
            for h in range(self.cfg.n_kv_heads):
                target[h] = part[h] if target[h] is None else _concat(target[h], part[h])
            pos += taken

    def _flush(self) -> None:
        for h in range(self.cfg.n_kv_heads):
            moved = shrink_to(self._window[h], self.occ.bits)
            self._body[h] = moved if self._body[h] is None else _concat(self._body[h], moved)
            self._window[h] = None

    def _shrink_body(self) -> None:
        for h in range(self.cfg.n_kv_heads):
            if self._body[h] is not None:
                self._body[h] = shrink(self._body[h])

    def blocks(self, head: int) -> list[QuantizedKV]:
        """The head's tokens in order as blocks of one width each: [sink, body, window] (non-empty)."""
        return [b for b in (self._sink[head], self._body[head], self._window[head]) if b is not None]

    def dequantized(self, head: int) -> np.ndarray:
        return np.concatenate([dequantize(b) for b in self.blocks(head)])


@dataclass
class LayerKVCache:
    """Keys and values of one layer, each a ProgressiveStore with its own budget."""
    cfg: CacheConfig
    key_budget: float
    value_budget: float

    def __post_init__(self):
        self.keys = ProgressiveStore(self.cfg, self.key_budget)
        self.values = ProgressiveStore(self.cfg, self.value_budget)

    def append(self, k, v) -> None:
        self.keys.append(k)
        self.values.append(v)

    def memory_bytes(self, metadata: bool) -> float:
        return self.keys.memory_bytes(metadata) + self.values.memory_bytes(metadata)


def _slice(b: QuantizedKV, lo: int, hi: int) -> QuantizedKV:
    return QuantizedKV(b.codes[lo:hi], b.scale[lo:hi], b.zero[lo:hi], b.bits)


def _concat(a: QuantizedKV, b: QuantizedKV) -> QuantizedKV:
    if a.bits != b.bits:
        raise AssertionError(f"concatenating blocks of {a.bits} and {b.bits} bits")
    return QuantizedKV(np.concatenate([a.codes, b.codes]), np.concatenate([a.scale, b.scale]),
                       np.concatenate([a.zero, b.zero]), a.bits)
