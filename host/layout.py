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

KERNEL_NAME = "pmkvq_attn"
WORD_BITS = 512
WORD_BYTES = WORD_BITS // 8
CODE_BITS = (16, 8, 4, 2)
MAX_GROUP = 8

# ---------------------------------------------------------------------------------------------------------
# AXI4-Lite register map (ap_ctrl_hs). 32-bit registers; a 64-bit address is two words (low word first).

CTRL, GIE, IER, ISR = 0x00, 0x04, 0x08, 0x0C
AP_START, AP_DONE, AP_IDLE, AP_READY = 0x1, 0x2, 0x4, 0x8

REGS = {  # name -> offset; 8-byte spacing from 0x10 (the same map as hw/regmap.py)
    "op": 0x10,           # OP_*
    "kind": 0x18,         # SHRINK/COPY: 0 keys, 1 values
    "n_heads": 0x20,      # KV heads in this launch (regions 0..n_heads-1 at the strides below)
    "group": 0x28,        # query heads per KV head (ATTENTION); must equal the kernel's G
    "head_dim": 0x30,     # must equal the kernel's HEAD_DIM
    "n_sink": 0x38,       # tokens in the sink block (16-bit codes)
    "n_body": 0x40,       # tokens in the body block (SHRINK: tokens of the block it shrinks)
    "n_window": 0x48,     # tokens in the window block (COPY: tokens it copies)
    "k_bits": 0x50,       # width of the key body (SHRINK/COPY of keys: width of the block they act on)
    "v_bits": 0x58,       # width of the value body
    "k_codes": 0x60,      # 64-bit: head 0's key codes region
    "v_codes": 0x68,      # 64-bit
    "k_meta": 0x70,       # 64-bit: head 0's key metadata region
    "v_meta": 0x78,       # 64-bit
    "query": 0x80,        # 64-bit: query records
    "partial": 0x88,      # 64-bit: partial-result records
    "k_window_off": 0x90,  # byte offset of the window block inside a key codes region (sink block at 0)
    "k_body_off": 0x98,
    "v_window_off": 0xA0,
    "v_body_off": 0xA8,
    "k_codes_stride": 0xB0,  # bytes from one head's key codes region to the next
    "v_codes_stride": 0xB8,
    "meta_stride": 0xC0,     # bytes from one head's metadata region to the next (keys and values)
    "status": 0xC8,          # read only: STATUS_* of the last launch, valid once ap_done is seen
    "meta_window_off": 0xD0,  # byte offset of the window's metadata inside a metadata region (sink's at 0)
    "meta_body_off": 0xD8,    # byte offset of the body's metadata
}
ADDRESS_REGS = ("k_codes", "v_codes", "k_meta", "v_meta", "query", "partial")
ARG_REGS = tuple(k for k in REGS if k != "status")

OP_ATTENTION, OP_SHRINK, OP_COPY = 1, 2, 3
OP_NAMES = {OP_ATTENTION: "ATTENTION", OP_SHRINK: "SHRINK", OP_COPY: "COPY"}
KIND_KEYS, KIND_VALUES = 0, 1

STATUS_OK = 0
STATUS_NAMES = {
    0: "OK",
    1: "BAD_OP: unknown or unsupported op code",
    2: "BAD_HEAD_DIM: head_dim differs from the kernel's HEAD_DIM",
    3: "BAD_GROUP: group differs from the kernel's G",
    4: "BAD_BITS: a width not in {16, 8, 4, 2}, or SHRINK of 2-bit codes",
    5: "BAD_TOKENS: no heads, no tokens, or more tokens than the kernel's max_tokens",
    6: "BAD_ADDRESS: an address, offset or stride is not 64-byte aligned (golden: or outside device memory)",
    7: "BAD_KIND: kind must be 0 (keys) or 1 (values)",
    8: "BAD_DATA (golden model only): a bf16 Inf/NaN pattern in metadata or a value scale <= 0",
}
(STATUS_BAD_OP, STATUS_BAD_HEAD_DIM, STATUS_BAD_GROUP, STATUS_BAD_BITS, STATUS_BAD_TOKENS,
 STATUS_BAD_ADDRESS, STATUS_BAD_KIND, STATUS_BAD_DATA) = range(1, 9)


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
