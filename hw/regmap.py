"""The kernel's register map and record formats: the single source for hw/kernel.py, the host runtime and
the Vitis packaging (docs/kernel-interface.md). Offsets in bytes on s_axi_control; 32-bit registers; a
64-bit address is two registers, low word first; arguments spaced 8 bytes apart from 0x10 (as HLS does)."""
from __future__ import annotations

KERNEL_NAME = "pmkvq_attn"
WORD_BITS = 512
WORD_BYTES = WORD_BITS // 8

CTRL, GIE, IER, ISR = 0x00, 0x04, 0x08, 0x0C
AP_START, AP_DONE, AP_IDLE, AP_READY = 0x1, 0x2, 0x4, 0x8

ARGS = {  # name: (offset, bits)
    "op": (0x10, 32),
    "kind": (0x18, 32),
    "n_heads": (0x20, 32),
    "group": (0x28, 32),
    "head_dim": (0x30, 32),
    "n_sink": (0x38, 32),
    "n_body": (0x40, 32),
    "n_window": (0x48, 32),
    "k_bits": (0x50, 32),
    "v_bits": (0x58, 32),
    "k_codes": (0x60, 64),
    "v_codes": (0x68, 64),
    "k_meta": (0x70, 64),
    "v_meta": (0x78, 64),
    "query": (0x80, 64),
    "partial": (0x88, 64),
    "k_window_off": (0x90, 32),
    "k_body_off": (0x98, 32),
    "v_window_off": (0xA0, 32),
    "v_body_off": (0xA8, 32),
    "k_codes_stride": (0xB0, 32),
    "v_codes_stride": (0xB8, 32),
    "meta_stride": (0xC0, 32),
    "meta_window_off": (0xD0, 32),
    "meta_body_off": (0xD8, 32),
}
STATUS = 0xC8  # read only: status of the last launch, valid once ap_done has been seen
DEBUG = 0xE0   # read only: engine 0's state and stream handshakes (hw/kernel.py Engine.debug), for diagnosis
ADDRESS_ARGS = tuple(n for n, (_, bits) in ARGS.items() if bits == 64)
ALIGNED_ARGS = ADDRESS_ARGS + ("k_window_off", "k_body_off", "v_window_off", "v_body_off", "k_codes_stride",
                               "v_codes_stride", "meta_stride", "meta_window_off", "meta_body_off")

# ATTENTION: decode attention of n_heads KV heads (sink, body, window blocks) for their G query heads.
# SHRINK: in place, 2n -> n bits, of the block at *_body_off / meta_body_off of each head (n_body tokens at
#   k_bits or v_bits, by kind), codes and scales. Pointing the offsets at the window shrinks the window.
# COPY: the block at *_window_off / meta_window_off (n_window tokens at k_bits or v_bits, by kind) is copied
#   to *_body_off / meta_body_off, codes and metadata: with SHRINK, how a full window joins the body.
OP_ATTENTION, OP_SHRINK, OP_COPY = 1, 2, 3
KIND_KEYS, KIND_VALUES = 0, 1

STATUS_NAMES = {
    0: "OK",
    1: "BAD_OP: unknown or unsupported op code",
    2: "BAD_HEAD_DIM: head_dim differs from the kernel's HEAD_DIM",
    3: "BAD_GROUP: group differs from the kernel's G",
    4: "BAD_BITS: a width not in {16, 8, 4, 2}, or SHRINK of 2-bit codes",
    5: "BAD_TOKENS: no heads, no tokens, or more tokens than the kernel's max_tokens",
    6: "BAD_ADDRESS: an address, offset or stride is not 64-byte aligned",
    7: "BAD_KIND: kind must be 0 (keys) or 1 (values)",
}
(STATUS_OK, STATUS_BAD_OP, STATUS_BAD_HEAD_DIM, STATUS_BAD_GROUP, STATUS_BAD_BITS, STATUS_BAD_TOKENS,
 STATUS_BAD_ADDRESS, STATUS_BAD_KIND) = range(8)


def ceil_words(nbytes: int) -> int:
    return -(-int(nbytes) // WORD_BYTES) * WORD_BYTES


def query_record_bytes(head_dim: int) -> int:
    """int16 codes[head_dim] at 0, int32 exponent at 2*head_dim, padded to whole words."""
    return ceil_words(2 * head_dim + 4)


def partial_record_bytes(head_dim: int) -> int:
    """int32 M at 0, int32 E at 4, int64 L at 8, int64 acc[head_dim] at 16, padded to whole words."""
    return ceil_words(16 + 8 * head_dim)
