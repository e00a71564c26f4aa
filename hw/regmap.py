"""The device-memory contract of the kernel `pmkvq_attn` (docs/kernel-interface.md), written once: the
register map, the op and status codes, the query/partial record formats, the per-engine memory geometry of
the KV cache and the rule that stripes a layer's tokens across the engines.

Consumers: the RTL (hw/kernel.py: control slave, argument checks), the Vitis packaging (hw/vitis.py:
kernel.xml), the host (host/kvcache.py, host/golden.py, host/device.py) and the kernel testbenches
(sim/kernel_image.py, tests/kernel/tb_kernel.py). Offsets in bytes on s_axi_control; 32-bit registers; a 64-bit
pointer is two registers, low word first; arguments spaced 8 bytes apart (as HLS does).

Engines: engine e reads and writes only its own two buffers: the KV cache at the 64-bit pointer `e{e}_base`,
which the host places in engine e's first HBM pseudo-channel, and the query and partial records at
`e{e}_records`, placed in its second (`record_pc`), so that the records written while the next KV head streams
do not take the cache PC's bandwidth. Every other address is a 32-bit byte offset inside one of an engine's
buffers, the same for all engines (the host lays every engine's buffers out alike). Token counts are per
engine: engine e covers `e{e}_n_sink + e{e}_n_body + e{e}_n_window` tokens of the layer (its slice).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmkvq_accel.model.cache import CacheConfig, Occupancy, advance, shrink_schedule
from pmkvq_accel.model.formats import MAX_PARTIAL_TOKENS, SUPPORTED_BITS

KERNEL_NAME = "pmkvq_attn"
WORD_BITS = 512                   # the contract's word: every region, offset and stride is a multiple of it
WORD_BYTES = WORD_BITS // 8
CODE_BITS = SUPPORTED_BITS
MAX_GROUP = 8
MAX_ENGINES = 32                  # one engine per HBM pseudo-channel at most
HBM_PCS = 32
ENGINE_SEGMENTS = 3               # token segments of one engine's launch: sink, body, window
# Tokens per engine and launch: the datapath's token buffers (one entry per WORD_BITS / 32 tokens, plus one per
# segment) then have 4 096 entries, one URAM288 (4K x 72) deep; 65 536 tokens would take 4 099, two deep.
BUFFER_ENTRIES = 4096
ENGINE_MAX_TOKENS = (BUFFER_ENTRIES - ENGINE_SEGMENTS) * (WORD_BITS // 32)   # 65 488
PC_BYTES = 256 << 20              # one U280 HBM pseudo-channel
CONTROL_ADDR_BITS = 12            # s_axi_control decodes 12 address bits (a 0x1000 window)
OFFSET_BITS = 32                  # an offset inside an engine's buffer (every OFFSET_ARGS register); sums of
                                  # offsets wrap at 2^32 in the kernel's address arithmetic

CTRL, GIE, IER, ISR = 0x00, 0x04, 0x08, 0x0C
AP_START, AP_DONE, AP_IDLE, AP_READY = 0x1, 0x2, 0x4, 0x8

ARGS = {  # shared by every engine: name -> (offset, bits)
    "op": (0x10, 32),
    "kind": (0x18, 32),
    "n_heads": (0x20, 32),
    "group": (0x28, 32),
    "head_dim": (0x30, 32),
    "k_bits": (0x38, 32),
    "v_bits": (0x40, 32),
    "k_codes": (0x48, 32),         # offsets inside an engine's buffer: head 0's key codes region, ...
    "v_codes": (0x50, 32),
    "k_meta": (0x58, 32),
    "v_meta": (0x60, 32),
    "query": (0x68, 32),           # query records (ATTENTION), inside an engine's records buffer
    "partial": (0x70, 32),         # partial-result records (ATTENTION), inside an engine's records buffer
    "k_window_off": (0x78, 32),    # inside a head's codes region
    "k_body_off": (0x80, 32),
    "v_window_off": (0x88, 32),
    "v_body_off": (0x90, 32),
    "k_codes_stride": (0x98, 32),
    "v_codes_stride": (0xA0, 32),
    "meta_stride": (0xA8, 32),
    "meta_window_off": (0xB0, 32),
    "meta_body_off": (0xB8, 32),
}
STATUS = 0xC0    # read only: status of the last launch, valid once ap_done has been seen
DEBUG = 0xC8     # read only: engine 0's state and stream handshakes (hw/kernel.py Engine.debug)
ENGINES = 0xD0   # read only: the number of engines the kernel was built with
PCS_PER_ENGINE = 0xD8  # read only: HBM pseudo-channels per engine (engine e: e*k .. e*k+k-1)
ENGINE_BASE, ENGINE_STRIDE = 0x100, 0x30
ENGINE_ARGS = {  # per engine, relative to ENGINE_BASE + e * ENGINE_STRIDE
    "base": (0x00, 64),            # the engine's KV-cache buffer
    "n_sink": (0x08, 32),
    "n_body": (0x10, 32),
    "n_window": (0x18, 32),
    "records": (0x20, 64),         # the engine's query/partial-record buffer
}
POINTER_ARGS = ("base", "records")
COUNT_FIELDS = ("n_sink", "n_body", "n_window")
OFFSET_ARGS = ("k_codes", "v_codes", "k_meta", "v_meta", "query", "partial", "k_window_off", "k_body_off",
               "v_window_off", "v_body_off", "k_codes_stride", "v_codes_stride", "meta_stride",
               "meta_window_off", "meta_body_off")
assert all(ARGS[n][1] == OFFSET_BITS for n in OFFSET_ARGS)


def engine_pcs(e: int, engines: int, pcs_per_engine: int = 1) -> tuple[int, ...]:
    """The HBM pseudo-channels engine e's master is bound to: a contiguous range of pcs_per_engine, from
    e * pcs_per_engine (the engine's cache buffer lives in the first, its records buffer in `record_pc`)."""
    if not 0 <= e < engines:
        raise ValueError(f"engine {e} out of range: the kernel has {engines}")
    k = pcs_per_engine
    return tuple(range(e * k, e * k + k))


def engine_arg(e: int, name: str) -> str:
    """Register name of engine e's per-engine argument `name` (base, n_sink, n_body, n_window)."""
    return f"e{e}_{name}"


def record_pc(pcs: tuple[int, ...]) -> int:
    """The pseudo-channel of an engine's records buffer, among its own PCs `pcs` (engine_pcs): the second
    one, so that record traffic does not share the cache PC's bandwidth; the only one if the engine has one."""
    return pcs[1] if len(pcs) > 1 else pcs[0]


def all_args(engines: int) -> dict[str, tuple[int, int]]:
    """Every argument register of a kernel with `engines` engines: name -> (offset, bits)."""
    if not 1 <= engines <= MAX_ENGINES:
        raise ValueError(f"engines must be 1..{MAX_ENGINES}, got {engines!r}")
    out = dict(ARGS)
    for e in range(engines):
        for name, (off, bits) in ENGINE_ARGS.items():
            out[engine_arg(e, name)] = (ENGINE_BASE + e * ENGINE_STRIDE + off, bits)
    return out


def aligned_args(engines: int) -> tuple[str, ...]:
    """Arguments that must be multiples of WORD_BYTES (else STATUS_BAD_ADDRESS)."""
    return OFFSET_ARGS + tuple(engine_arg(e, p) for e in range(engines) for p in POINTER_ARGS)


def regs(engines: int) -> dict[str, int]:
    """name -> offset of every register the host writes or reads (arguments, status, engines)."""
    out = {name: off for name, (off, _) in all_args(engines).items()}
    out.update(status=STATUS, engines=ENGINES, pcs_per_engine=PCS_PER_ENGINE)
    return out


# ATTENTION: every engine with tokens runs decode attention over its slice (sink, body, window blocks) for
#   each of the n_heads KV heads and their G query heads, writing G partial records per head.
# SHRINK: in place, 2n -> n bits, of the block at *_body_off / meta_body_off of each head (e{e}_n_body tokens
#   at k_bits or v_bits, by kind), codes and scales, in every engine with e{e}_n_body > 0. Pointing the
#   offsets at the window shrinks the window.
# COPY: the block at *_window_off / meta_window_off (e{e}_n_window tokens at k_bits or v_bits, by kind) is
#   copied to *_body_off / meta_body_off, codes and metadata, in every engine with e{e}_n_window > 0.
OP_ATTENTION, OP_SHRINK, OP_COPY = 1, 2, 3
OP_NAMES = {OP_ATTENTION: "ATTENTION", OP_SHRINK: "SHRINK", OP_COPY: "COPY"}
KIND_KEYS, KIND_VALUES = 0, 1

(STATUS_OK, STATUS_BAD_OP, STATUS_BAD_HEAD_DIM, STATUS_BAD_GROUP, STATUS_BAD_BITS, STATUS_BAD_TOKENS,
 STATUS_BAD_ADDRESS, STATUS_BAD_KIND, STATUS_BAD_DATA) = range(9)
STATUS_NAMES = {
    STATUS_OK: "OK",
    STATUS_BAD_OP: "BAD_OP: unknown or unsupported op code",
    STATUS_BAD_HEAD_DIM: "BAD_HEAD_DIM: head_dim differs from the kernel's HEAD_DIM",
    STATUS_BAD_GROUP: "BAD_GROUP: group differs from the kernel's G",
    STATUS_BAD_BITS: "BAD_BITS: a width not in {16, 8, 4, 2}, or SHRINK of 2-bit codes",
    STATUS_BAD_TOKENS: "BAD_TOKENS: no heads, no engine with tokens, or an engine with more tokens than the "
                       "kernel's max_tokens",
    STATUS_BAD_ADDRESS: "BAD_ADDRESS: an address, offset or stride is not 64-byte aligned "
                        "(golden: or outside device memory)",
    STATUS_BAD_KIND: "BAD_KIND: kind must be 0 (keys) or 1 (values)",
    STATUS_BAD_DATA: "BAD_DATA (golden model only): a bf16 Inf/NaN pattern in metadata or a value scale <= 0",
}


# ---------------------------------------------------------------------------------------------------------
# Records

def ceil_words(nbytes: int) -> int:
    """nbytes rounded up to whole 512-bit words."""
    return -(-int(nbytes) // WORD_BYTES) * WORD_BYTES


def codes_bytes(tokens: int, head_dim: int, bits: int) -> int:
    """Bytes of a packed block of `tokens` tokens of one head at `bits` (word padded)."""
    return ceil_words(-(-tokens * head_dim * bits // 8))


def query_dtype(head_dim: int) -> np.dtype:
    """Query record: int16 codes[head_dim] at 0, int32 exponent at 2*head_dim; word padded."""
    return np.dtype({"names": ["q", "exp"], "formats": [("<i2", (head_dim,)), "<i4"],
                     "offsets": [0, 2 * head_dim], "itemsize": ceil_words(2 * head_dim + 4)})


def partial_dtype(head_dim: int) -> np.dtype:
    """Partial record: int32 M at 0, int32 E at 4, int64 L at 8, int64 acc[head_dim] at 16; word padded."""
    return np.dtype({"names": ["m", "E", "L", "acc"], "formats": ["<i4", "<i4", "<i8", ("<i8", (head_dim,))],
                     "offsets": [0, 4, 8, 16], "itemsize": ceil_words(16 + 8 * head_dim)})


@dataclass(frozen=True)
class RecordLayout:
    """An engine's records buffer: [query records | partial records], one of each per (KV head, query head)."""
    query: int        # offset of the query records (the `query` argument)
    partial: int      # offset of the partial records (the `partial` argument)
    nbytes: int       # the buffer's size

    @classmethod
    def of(cls, n_heads: int, group: int, head_dim: int) -> "RecordLayout":
        partial = ceil_words(n_heads * group * query_record_bytes(head_dim))
        return cls(0, partial, partial + ceil_words(n_heads * group * partial_record_bytes(head_dim)))

    def args(self) -> dict[str, int]:
        return {"query": self.query, "partial": self.partial}


def query_record_bytes(head_dim: int) -> int:
    return query_dtype(head_dim).itemsize


def partial_record_bytes(head_dim: int) -> int:
    return partial_dtype(head_dim).itemsize


# ---------------------------------------------------------------------------------------------------------
# Striping: a layer's tokens across the engines

def block_engine(block: int, engines: int) -> int:
    """The engine that holds window block `block` (0, 1, ... in the order the windows fill): blocks are
    dealt round-robin, so every engine's body is a run of whole windows and slices differ by one window at
    most. The sink lives in engine 0; the window being filled lives in the engine it will join."""
    return block % engines


def block_slot(block: int, engines: int) -> int:
    """Where window block `block` sits in its engine's body: the engine's block_slot-th window."""
    return block // engines


def engine_block_count(blocks: int, e: int, engines: int) -> int:
    """How many of window blocks 0 .. blocks-1 engine e holds (those with block_engine(k) == e)."""
    return blocks // engines + (1 if e < blocks % engines else 0)


def slices(occ: Occupancy, engines: int) -> list[tuple[int, int, int]]:
    """(n_sink, n_body, n_window) of every engine for a store in state `occ` (whole windows in the body)."""
    w = occ.cfg.window
    if occ.body % w:
        raise AssertionError(f"body of {occ.body} tokens is not whole windows of {w}")
    blocks = occ.body // w
    out = []
    for e in range(engines):
        mine = engine_block_count(blocks, e, engines)
        out.append((occ.sink if e == 0 else 0, mine * w,
                    occ.window if block_engine(blocks, engines) == e else 0))
    return out


# ---------------------------------------------------------------------------------------------------------
# Geometry of one layer inside an engine's buffer

@dataclass(frozen=True)
class KindLayout:
    """Codes region of one tensor kind (keys or values) of one layer, per KV head:
    [sink block | window block | body block], each starting on a word."""
    window_off: int
    body_off: int
    body_capacity: int    # bytes reserved for one engine's body codes (its peak up to max_len tokens)
    codes_stride: int     # bytes of a head's codes region


@dataclass(frozen=True)
class CacheGeometry:
    """Per-layer sizes of one engine's share of the device KV cache for a cache config, budgets, max_len and
    engine count. Metadata region of a head (keys and values alike): [sink | window | body] uint32 entries,
    each block starting on a word."""
    cfg: CacheConfig
    max_len: int
    engines: int
    keys: KindLayout
    values: KindLayout
    meta_window_off: int
    meta_body_off: int
    meta_stride: int

    @property
    def layer_bytes(self) -> int:
        """Bytes of the layer in one engine's buffer."""
        h = self.cfg.n_kv_heads
        return h * (self.keys.codes_stride + self.values.codes_stride + 2 * self.meta_stride)

    def region_offsets(self, base: int) -> dict[str, int]:
        """Offsets of the layer's four regions when the layer starts at `base` in an engine's buffer."""
        h, out = self.cfg.n_kv_heads, {}
        for name, size in (("k_codes", h * self.keys.codes_stride), ("v_codes", h * self.values.codes_stride),
                           ("k_meta", h * self.meta_stride), ("v_meta", h * self.meta_stride)):
            out[name], base = base, base + size
        return out

    def launch_args(self, base: int) -> dict[str, int]:
        """The shared argument registers that locate this layer (at `base` in every engine's buffer)."""
        g = self
        return dict(n_heads=g.cfg.n_kv_heads, head_dim=g.cfg.head_dim, meta_stride=g.meta_stride,
                    k_window_off=g.keys.window_off, k_body_off=g.keys.body_off,
                    v_window_off=g.values.window_off, v_body_off=g.values.body_off,
                    k_codes_stride=g.keys.codes_stride, v_codes_stride=g.values.codes_stride,
                    meta_window_off=g.meta_window_off, meta_body_off=g.meta_body_off,
                    **self.region_offsets(base))


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


def body_capacity(cfg: CacheConfig, budget: float, max_len: int, engines: int = 1) -> tuple[int, int]:
    """(bytes of body codes per head, body tokens) the fullest engine reaches over max_len tokens.
    Runs the model/cache accounting itself; raises BudgetError if the budget cannot hold max_len tokens."""
    shrink_schedule(cfg, budget, max_len)  # BudgetError with the reference's message
    occ, peak, tokens, flushes, pos = Occupancy(cfg), [0], [0], [0], 0

    def on_flush():  # window block k joins engine k % N's body at the body's width, before any shrink
        k = flushes[0]
        mine = engine_block_count(k + 1, block_engine(k, engines), engines)
        flushes[0] += 1
        peak[0] = max(peak[0], mine * cfg.window * occ.bits)
        tokens[0] = max(tokens[0], mine * cfg.window)
    while pos < max_len:
        pos += advance(occ, max_len - pos, budget, [], on_flush=on_flush)
    return ceil_words(-(-peak[0] * cfg.head_dim // 8)), tokens[0]


def cache_geometry(cfg: CacheConfig, key_budget: float, value_budget: float, max_len: int,
                   engines: int = 1) -> CacheGeometry:
    """The geometry the host's cache manager uses: body capacities from the PM-KVQ accounting."""
    check_cache_config(cfg, max_len)
    if not 1 <= engines <= MAX_ENGINES:
        raise ValueError(f"engines must be 1..{MAX_ENGINES}, got {engines!r}")
    (kbytes, ktok), (vbytes, vtok) = (body_capacity(cfg, b, max_len, engines) for b in (key_budget, value_budget))
    return geometry(cfg, max_len, engines, kbytes, vbytes, max(ktok, vtok))


def fixed_geometry(cfg: CacheConfig, body_tokens: int, engines: int = 1) -> CacheGeometry:
    """A geometry with room for `body_tokens` body tokens at 16 bits per engine (testbenches and tools that
    place blocks directly, without the accounting)."""
    body = codes_bytes(body_tokens, cfg.head_dim, 16)
    return geometry(cfg, body_tokens + cfg.n_sink + cfg.window, engines, body, body, body_tokens)


def geometry(cfg: CacheConfig, max_len: int, engines: int, key_body_bytes: int, value_body_bytes: int,
             body_tokens: int) -> CacheGeometry:
    """[sink | window | body] codes and metadata regions per head with the given body capacities."""
    hd = cfg.head_dim
    most = min(max_len, cfg.n_sink + cfg.window + body_tokens)    # the fullest engine's tokens of a layer
    if most > ENGINE_MAX_TOKENS:
        raise ValueError(f"an engine would hold up to {most} tokens of a layer "
                         f"(sink {cfg.n_sink}, window {cfg.window}, body {body_tokens}); the kernel takes at most "
                         f"{ENGINE_MAX_TOKENS} per engine: use more engines or a shorter max_len")
    sink, window = codes_bytes(cfg.n_sink, hd, 16), codes_bytes(cfg.window, hd, 16)

    def kind(body):
        return KindLayout(window_off=sink, body_off=sink + window, body_capacity=body,
                          codes_stride=sink + window + body)
    msink, mwin = ceil_words(4 * cfg.n_sink), ceil_words(4 * cfg.window)
    return CacheGeometry(cfg, max_len, engines, kind(key_body_bytes), kind(value_body_bytes),
                         meta_window_off=msink, meta_body_off=msink + mwin,
                         meta_stride=msink + mwin + ceil_words(4 * body_tokens))
