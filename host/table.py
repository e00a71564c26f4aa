"""The bit-width table the host decodes with.

The table format and its loader belong to calibration (calib/table.py: `load_table`, `apply_reparam`,
`default_table_path`), which the host requires (it ships in the same package). When no table is given and
none is committed for the model, the host uses a clearly
labelled built-in fallback: every layer budgeted for 4-bit keys and values at FALLBACK_MAX_LEN tokens
(sink 1, window 128, body from 16 bits), no key reparameterisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pmkvq_accel.calib import table as calib_table
from pmkvq_accel.model.cache import CacheConfig, budget_for_width, shrink_schedule

FALLBACK_BITS = 4
FALLBACK_MAX_LEN = 4096
FALLBACK_N_SINK = 1
FALLBACK_WINDOW = 128


@dataclass(frozen=True)
class FallbackLayer:
    layer: int
    key_bits: int
    value_bits: int
    key_budget_bytes: float
    value_budget_bytes: float
    n_sink: int
    window: int
    count_metadata: bool = True
    body_init_bits: int = 16

    def cache_config(self, n_kv_heads: int, head_dim: int) -> CacheConfig:
        return CacheConfig(n_kv_heads, head_dim, self.n_sink, self.window, self.body_init_bits, self.count_metadata)


@dataclass(frozen=True)
class FallbackTable:
    """Same attributes as calib.table.BitWidthTable where the host uses them."""
    model_id: str
    max_len: int
    layers: tuple
    path: Path | None = None
    reparam_path: Path | None = None
    label: str = ""


def fallback_table(n_layers: int, n_kv_heads: int, head_dim: int, model_id: str = "?",
                   bits: int = FALLBACK_BITS, max_len: int = FALLBACK_MAX_LEN) -> FallbackTable:
    cfg = CacheConfig(n_kv_heads, head_dim, FALLBACK_N_SINK, FALLBACK_WINDOW)
    budget = budget_for_width(cfg, bits, max_len)
    final = (shrink_schedule(cfg, budget, max_len) or [(0, cfg.body_init_bits)])[-1][1]
    layers = tuple(FallbackLayer(i, final, final, budget, budget, FALLBACK_N_SINK, FALLBACK_WINDOW)
                   for i in range(n_layers))
    return FallbackTable(model_id, max_len, layers,
                         label=f"built-in fallback (uniform {bits}-bit budgets at {max_len} tokens, no reparam; "
                               f"no calibrated table found)")


def load_for_model(config, path=None, model_id: str = "?"):
    """(table, label) for a model with this transformers config: the table at `path`, else the committed
    table of the default model, else the built-in fallback. A table made for another model raises calib's
    TableMismatchError (a ValueError)."""
    if path is not None:
        return calib_table.load_table(path, config), f"{Path(path)}"
    default = calib_table.default_table_path(model_id) if model_id != "?" else calib_table.default_table_path()
    if Path(default).is_file():
        return calib_table.load_table(default, config), f"{default} (committed)"
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    hd = getattr(config, "head_dim", None) or config.hidden_size // hq
    fb = fallback_table(config.num_hidden_layers, hkv, hd, model_id)
    return fb, fb.label


def apply_reparam(model, table) -> bool:
    """Fold the table's key reparameterisation factors into the model; False if it has none."""
    if getattr(table, "reparam_path", None) is None:
        return False
    calib_table.apply_reparam(model, table)
    return True
