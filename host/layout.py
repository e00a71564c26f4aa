"""The kernel contract (docs/kernel-interface.md): register map, op and status codes, and the device-memory
layout of the KV cache, the query buffer and the partial-result buffer.

Every backend (golden, sim, u280) and the host code share this module, so the host writes exactly the bytes and
registers the kernel reads. Sizes are in bytes; every region starts on a 512-bit (64-byte) word.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmkvq_accel.model.cache import CacheConfig, Occupancy, advance, shrink_schedule
from pmkvq_accel.model.formats import MAX_PARTIAL_TOKENS

from pmkvq_accel.hw import regmap as R

# The register map, op and status codes are the kernel's own (hw/regmap.py): one definition for both sides.
KERNEL_NAME = R.KERNEL_NAME
WORD_BITS = R.WORD_BITS
WORD_BYTES = R.WORD_BYTES
CODE_BITS = (16, 8, 4, 2)
MAX_GROUP = 8

CTRL, GIE, IER, ISR = R.CTRL, R.GIE, R.IER, R.ISR
AP_START, AP_DONE, AP_IDLE, AP_READY = R.AP_START, R.AP_DONE, R.AP_IDLE, R.AP_READY

REGS = dict(sorted({**{name: off for name, (off, _) in R.ARGS.items()}, "status": R.STATUS}.items(),
                   key=lambda item: item[1]))  # name -> offset, in address order
ADDRESS_REGS = R.ADDRESS_ARGS
ARG_REGS = tuple(name for name in REGS if name != "status")

OP_ATTENTION, OP_SHRINK, OP_COPY = R.OP_ATTENTION, R.OP_SHRINK, R.OP_COPY
OP_NAMES = {OP_ATTENTION: "ATTENTION", OP_SHRINK: "SHRINK", OP_COPY: "COPY"}
KIND_KEYS, KIND_VALUES = R.KIND_KEYS, R.KIND_VALUES

STATUS_OK = R.STATUS_OK
(STATUS_BAD_OP, STATUS_BAD_HEAD_DIM, STATUS_BAD_GROUP, STATUS_BAD_BITS, STATUS_BAD_TOKENS,
 STATUS_BAD_ADDRESS, STATUS_BAD_KIND) = (R.STATUS_BAD_OP, R.STATUS_BAD_HEAD_DIM, R.STATUS_BAD_GROUP,
                                         R.STATUS_BAD_BITS, R.STATUS_BAD_TOKENS, R.STATUS_BAD_ADDRESS,
                                         R.STATUS_BAD_KIND)
STATUS_BAD_DATA = 8  # the golden backend's extra check (the RTL does not inspect data)
STATUS_NAMES = {**R.STATUS_NAMES,
                STATUS_BAD_ADDRESS: R.STATUS_NAMES[R.STATUS_BAD_ADDRESS] + " (golden: or outside device memory)",
                STATUS_BAD_DATA: "BAD_DATA (golden model only): a bf16 Inf/NaN pattern in metadata or a value scale <= 0"}


def ceil_words(nbytes: int) -> int:
    """nbytes rounded up to whole 512-bit words."""
    return -(-int(nbytes) // WORD_BYTES) * WORD_BYTES


def codes_bytes(tokens: int, head_dim: int, bits: int) -> int:
    """Bytes of a packed block of `tokens` tokens of one head at `bits` (word padded)."""
    return ceil_words(-(-tokens * head_dim * bits // 8))


# ---------------------------------------------------------------------------------------------------------
# Query and partial-result records, one per (KV head, query head of its group), in that order.

def query_dtype(head_dim: int) -> np.dtype:
    """Query record: int16 codes[head_dim] at 0, int32 exponent at 2*head_dim; word padded."""
    return np.dtype({"names": ["q", "exp"], "formats": [("<i2", (head_dim,)), "<i4"],
                     "offsets": [0, 2 * head_dim], "itemsize": ceil_words(2 * head_dim + 4)})


def partial_dtype(head_dim: int) -> np.dtype:
    """Partial record: int32 M at 0, int32 E at 4, int64 L at 8, int64 acc[head_dim] at 16; word padded."""
    return np.dtype({"names": ["m", "E", "L", "acc"], "formats": ["<i4", "<i4", "<i8", ("<i8", (head_dim,))],
                     "offsets": [0, 4, 8, 16], "itemsize": ceil_words(16 + 8 * head_dim)})


# ---------------------------------------------------------------------------------------------------------
# KV cache regions

@dataclass(frozen=True)
class KindLayout:
    """Codes region of one tensor kind (keys or values) of one layer, per KV head:
    [sink block | window block | body block], each starting on a word."""
    window_off: int
    body_off: int
    body_capacity: int    # bytes reserved for the body codes (enough for any state up to max_len tokens)
    codes_stride: int     # bytes of a head's codes region


@dataclass(frozen=True)
class CacheGeometry:
    """Per-layer sizes of the device KV cache for a given cache config, budgets and max_len.
    Metadata region of a head (keys and values alike): [sink | window | body] uint32 entries, each block
    starting on a word; the body block holds up to max_len entries."""
    cfg: CacheConfig
    max_len: int
    keys: KindLayout
    values: KindLayout
    meta_window_off: int
    meta_body_off: int
    meta_stride: int

    @property
    def layer_bytes(self) -> int:
        h = self.cfg.n_kv_heads
        return h * (self.keys.codes_stride + self.values.codes_stride + 2 * self.meta_stride)


def check_cache_config(cfg: CacheConfig, max_len: int) -> None:
    """The contract's constraints on a cache configuration (clear ValueError otherwise)."""
    hd = cfg.head_dim
    if hd * 16 % WORD_BITS:
        raise ValueError(f"head_dim {hd}: a 16-bit token must fill whole {WORD_BITS}-bit words "
                         f"(head_dim a multiple of {WORD_BITS // 16})")
    if cfg.window * hd * 2 % WORD_BITS or cfg.window * 32 % WORD_BITS:
        raise ValueError(f"window {cfg.window} with head_dim {hd}: a whole window (its 2-bit codes and its "
                         f"32-bit metadata) must fill whole {WORD_BITS}-bit words: window a multiple of "
                         f"{max(WORD_BITS // 32, WORD_BITS // (2 * hd))}")
    if not 1 <= max_len <= MAX_PARTIAL_TOKENS:
        raise ValueError(f"max_len {max_len} out of range: the kernel takes 1..{MAX_PARTIAL_TOKENS} tokens")


def body_capacity(cfg: CacheConfig, budget: float, max_len: int) -> int:
    """Largest body (bytes of codes per head) the progressive cache reaches over max_len tokens.
    Runs the model/cache accounting itself; raises BudgetError if the budget cannot hold max_len tokens."""
    shrink_schedule(cfg, budget, max_len)  # BudgetError with the reference's message
    occ, peak, pos = Occupancy(cfg), [0], 0

    def on_flush():  # the window joins the body at the body's width, before any shrink
        peak[0] = max(peak[0], (occ.body + occ.window) * occ.bits)
    while pos < max_len:
        pos += advance(occ, max_len - pos, budget, [], on_flush=on_flush)
    peak[0] = max(peak[0], occ.body * occ.bits)
    return ceil_words(-(-peak[0] * cfg.head_dim // 8))


def cache_geometry(cfg: CacheConfig, key_budget: float, value_budget: float, max_len: int) -> CacheGeometry:
    check_cache_config(cfg, max_len)
    hd = cfg.head_dim
    sink = codes_bytes(cfg.n_sink, hd, 16)
    window = codes_bytes(cfg.window, hd, 16)

    def kind(budget):
        body = body_capacity(cfg, budget, max_len)
        return KindLayout(window_off=sink, body_off=sink + window, body_capacity=body,
                          codes_stride=sink + window + body)
    msink, mwin = ceil_words(4 * cfg.n_sink), ceil_words(4 * cfg.window)
    return CacheGeometry(cfg, max_len, kind(key_budget), kind(value_budget), meta_window_off=msink,
                         meta_body_off=msink + mwin, meta_stride=msink + mwin + ceil_words(4 * max_len))
