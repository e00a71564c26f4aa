"""Hardware parameters of the decode-attention datapath, validated at the edge.

A `DatapathConfig` fixes everything that is elaborated into the RTL: the memory word width, head_dim,
the number of query heads per KV head (G), and the size of the on-chip token buffers. Code widths
(16/8/4/2) and the token segments are run-time values carried by the job descriptor.
"""
from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Mux
from amaranth.lib import enum

from pmkvq_accel.model.formats import MAX_PARTIAL_TOKENS, SUPPORTED_BITS, code_bits, width_code

WORD_BITS = (64, 128, 256, 512)
HEAD_DIMS = (64, 128)
MAX_GROUPS = 8


class WidthCode(enum.Enum, shape=2):
    """The 2-bit code-width field of every port, register and job (the mapping is model.formats.width_code).
    The RTL compares run-time width fields with these members and selects by them (`by_width`)."""
    W2 = width_code(2)
    W4 = width_code(4)
    W8 = width_code(8)
    W16 = width_code(16)

    @property
    def bits(self) -> int:
        return code_bits(self.value)

    @classmethod
    def of(cls, bits: int) -> "WidthCode":
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported code width {bits!r}: supported widths are {SUPPORTED_BITS}")
        return cls(width_code(bits))


BY_CODE = tuple(sorted(WidthCode, key=lambda w: w.value))   # members in code order: index = code (Array lookups)


def lb_of(bits: int) -> int:
    """The width code of `bits` as an integer (job descriptors, bench payloads)."""
    return WidthCode.of(bits).value


def by_width(code, value_of, widths=BY_CODE):
    """value_of(w) for the run-time width code `code` (RTL): a Mux chain over `widths` in order, the last one
    taken for any other code."""
    out = value_of(widths[-1])
    for w in reversed(widths[:-1]):
        out = Mux(code == w, value_of(w), out)
    return out


def code_of_bits(bits):
    """The width code of a run-time bit count (RTL); an unsupported count gives code 0 (`is_supported_bits`
    says which)."""
    code = Const(0, 2)
    for w in WidthCode:
        code = Mux(bits == w.bits, w, code)
    return code


def is_supported_bits(bits):
    """A run-time bit count is one of the supported code widths (RTL)."""
    return Cat(*[bits == w.bits for w in WidthCode]).any()


def wide_code(code):
    """8- or 16-bit codes (RTL): the widths whose tokens fill slot 0's 16-bit lanes."""
    return (code == WidthCode.W8) | (code == WidthCode.W16)


@dataclass(frozen=True)
class DatapathConfig:
    word_bits: int = 512          # memory word (one word accepted per cycle)
    head_dim: int = 128
    groups: int = 3               # G query heads served by one pass over a KV head
    max_tokens: int = MAX_PARTIAL_TOKENS   # tokens of one run (on-chip score / value-metadata buffers)
    max_segments: int = 4         # token segments per job (e.g. sink, body, window)

    def __post_init__(self):
        if self.word_bits not in WORD_BITS:
            raise ValueError(f"unsupported memory word width {self.word_bits!r}: use one of {WORD_BITS} bits")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"unsupported head_dim {self.head_dim!r}: the datapath supports {HEAD_DIMS}")
        if not isinstance(self.groups, int) or not 1 <= self.groups <= MAX_GROUPS:
            raise ValueError(f"unsupported G (query heads per KV head) {self.groups!r}: use 1..{MAX_GROUPS}")
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= MAX_PARTIAL_TOKENS:
            raise ValueError(f"max_tokens must be in 1..{MAX_PARTIAL_TOKENS}, got {self.max_tokens!r}")
        if not isinstance(self.max_segments, int) or not 1 <= self.max_segments <= 16:
            raise ValueError(f"max_segments must be in 1..16, got {self.max_segments!r}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def nj(self) -> int:
        """Token slots per word: the most tokens one word can hold (2-bit codes)."""
        return max(1, self.word_bits // (2 * self.head_dim))

    @property
    def value_slots(self) -> int:
        """Token slots of the value pass (weights, run sums, MAC): max(1, nj / 2), the tokens of a 4-bit word.
        A value word holding more tokens (2-bit codes, nj >= 2) takes two cycles, its halves one after the
        other (`value_halves`)."""
        return max(1, self.nj // 2)

    def value_tpw(self, bits: int) -> int:
        """Tokens per value-pass beat at this width (0 when one token spans several words)."""
        return min(self.tpw(bits), self.value_slots)

    def value_halves(self, bits: int) -> int:
        """Beats (cycles) per value word at this width: 2 where a word holds more tokens than the value
        pass has slots (its second beat takes the word's upper half), else 1."""
        return 2 if self.tpw(bits) > self.value_slots else 1

    @property
    def mpw(self) -> int:
        """Metadata entries (tokens) per memory word: 32 bits each."""
        return self.word_bits // 32

    def tpw(self, bits: int) -> int:
        """Tokens per word at this width (0 when one token spans several words)."""
        return self.word_bits // (bits * self.head_dim)

    def wpt(self, bits: int) -> int:
        """Words per token at this width (1 when a word holds one or more tokens)."""
        return max(1, bits * self.head_dim // self.word_bits)

    def slot_widths(self, slot: int) -> tuple[int, ...]:
        """The code widths whose tokens reach token slot `slot` of a word (slot 0 holds every width; slot j
        >= 1 only widths with more than j tokens per word). The unpacker fills lanes by this rule and the
        score and value units size each slot's arithmetic by it."""
        return tuple(b for b in SUPPORTED_BITS if slot == 0 or self.tpw(b) > slot)

    def slot_bits(self, slot: int) -> int:
        """The widest code that reaches token slot `slot`."""
        return max(self.slot_widths(slot))

    @property
    def max_wpt(self) -> int:
        return self.wpt(16)

    @property
    def field_bits(self) -> dict:
        """Widths of the per-word fields the controller hands along: buffer entry, token lane `gl` (0..mpw),
        word of a token `wi`, tokens in the word `ntok`."""
        return {"entry": max(1, (self.entries - 1).bit_length()), "gl": max(1, (self.mpw - 1).bit_length()) + 1,
                "wi": max(1, (self.max_wpt - 1).bit_length()), "ntok": self.nj.bit_length()}

    @property
    def entries(self) -> int:
        """Buffer entries: one per group of `mpw` tokens; each segment starts a new entry."""
        return -(-self.max_tokens // self.mpw) + self.max_segments

    def group_code_words(self, bits: int) -> int:
        """Code words of a full metadata group (mpw tokens); independent of the word width."""
        return self.head_dim * bits // 32


# DatapathConfig.value_slots at most (the widest word, the narrowest head)
MAX_VALUE_SLOTS = DatapathConfig(word_bits=max(WORD_BITS), head_dim=min(HEAD_DIMS)).value_slots
