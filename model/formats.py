"""The datapath's fixed formats (docs/numerics.md). One place for every constant the RTL shares."""

SUPPORTED_BITS = (16, 8, 4, 2)       # KV code widths
QUERY_BITS = 16                      # query codes are signed, |Q| <= 2^15 - 1
QUERY_MAX = (1 << (QUERY_BITS - 1)) - 1
SCORE_FRAC = 16                      # scores: signed fixed point, log2 domain, 16 fraction bits
SCORE_BITS = 32                      # saturating, symmetric +-(2^31 - 1)
TERM_LIMIT_BITS = 62                 # each score term saturates at +-(2^62 - 1) before the subtraction
P_FRAC = 32                          # softmax weights p = 2^(score - max) in [0, 1], 32 fraction bits
EXP2_SEGMENTS_LOG2 = 8               # exp2 table: 256 segments, 257 entries, linear interpolation
EXP2_SHIFT_MAX = 62                  # p = rshr(v, min(n, EXP2_SHIFT_MAX)) (numerics.md section 6)
W_BITS = 26                          # per-token value weights W < 2^26 (a DSP48E2 27-bit port, unsigned)
ACC_UNIT_OFFSET = 8 + W_BITS         # accumulator unit = 2^(E - ACC_UNIT_OFFSET)
MAX_PARTIAL_TOKENS = 1 << 16         # tokens one partial may cover: keeps every accumulator in int64
SCALE_MIN, SCALE_MAX = 1e-5, 1e5     # quantizer scale clamp (PM-KVQ)
BF16_EXP_BIAS = 134                  # bf16 (m, x) fields: x = exponent_field - 134 (normal), 1 - 134 (subnormal)
BF16_SUBNORMAL_EXP = 1 - BF16_EXP_BIAS
W_SHIFT_BIAS = 48 - ACC_UNIT_OFFSET  # W = rshr(p * ms, E + W_SHIFT_BIAS - xs - bits)   (numerics.md section 6)
Z_SHIFT_BIAS = P_FRAC - ACC_UNIT_OFFSET  # Z = rshr(p * mz, E + Z_SHIFT_BIAS - xz)
WIDTH_CODES = {2: 0, 4: 1, 8: 2, 16: 3}  # the 2-bit width code every port, register and job field carries


def width_code(bits: int) -> int:
    """Width -> 2-bit code (2 -> 0, 4 -> 1, 8 -> 2, 16 -> 3)."""
    return WIDTH_CODES[check_bits(bits)]


def code_bits(code: int) -> int:
    """2-bit width code -> width."""
    return 2 << int(code)


def check_bits(bits: int, what: str = "bit width") -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported {what} {bits!r}: supported widths are {SUPPORTED_BITS}")
    return int(bits)
