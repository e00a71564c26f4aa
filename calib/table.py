"""PM-KVQ bit-width tables: the contract between calibration (calib/calibrate.py) and the host runtime.

A table is a versioned JSON file (schema: calib/schema/bitwidth_table.schema.json) that names the model
(id + a hash of the architecture fields of its config) and gives, per layer, the final key/value widths,
the key/value byte budgets, the sink/window settings and the progressive shrink schedule at `max_len`
tokens. Budgets use exactly the accounting of `pmkvq_accel.model.cache` (sink and window stored at 16 bits,
scales/zeros counted when `count_metadata` is true), so they go straight into
`LayerKVCache(table.cache_config(), layer.key_budget_bytes, layer.value_budget_bytes)`.

Key reparameterisation factors (one per KV head and channel, equal on each RoPE pair) live in a safetensors
file beside the table; `apply_reparam(model, table)` folds them into the q/k projections of a loaded model.

    from pmkvq_accel.calib.table import load_table, default_table_path, apply_reparam
    table = load_table(default_table_path(), model.config)   # raises TableMismatchError if it does not fit
    apply_reparam(model, table)                              # once, before decoding
    caches = table.layer_caches()                            # one LayerKVCache per layer
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pmkvq_accel.model.cache import BudgetError, CacheConfig, LayerKVCache, budget_for_width, shrink_schedule
from pmkvq_accel.model.llm import attention_modules

FORMAT = "pmkvq-bitwidth-table"
VERSION = 1
TABLES_DIR = Path(__file__).resolve().parent / "tables"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "bitwidth_table.schema.json"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

# Config fields that determine the KV cache shape and the meaning of the reparameterisation factors.
_HASHED_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "vocab_size", "rope_theta")


class TableError(ValueError):
    """The table file is malformed, inconsistent, or of an unsupported version."""


class TableMismatchError(TableError):
    """The table was made for a different model than the one it is loaded for."""


# ----------------------------------------------------------------------------------------------------------
# Model identity

def _config_of(model_or_config) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def _get(cfg, name, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def model_fingerprint(model_or_config) -> dict:
    """The architecture fields of a transformers config (or model, or plain dict) that a table depends on."""
    cfg = _config_of(model_or_config)
    n_heads = _get(cfg, "num_attention_heads")
    hidden = _get(cfg, "hidden_size")
    if n_heads is None or hidden is None or _get(cfg, "num_hidden_layers") is None:
        raise TableError("model config lacks num_attention_heads / hidden_size / num_hidden_layers")
    head_dim = _get(cfg, "head_dim") or hidden // n_heads
    rope_theta = _get(cfg, "rope_theta")
    if rope_theta is None:  # transformers 5 keeps it in rope_parameters
        rp = _get(cfg, "rope_parameters") or {}
        rope_theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    fp = {
        "model_type": _get(cfg, "model_type"),
        "num_hidden_layers": int(_get(cfg, "num_hidden_layers")),
        "hidden_size": int(hidden),
        "num_attention_heads": int(n_heads),
        "num_key_value_heads": int(_get(cfg, "num_key_value_heads") or n_heads),
        "head_dim": int(head_dim),
        "intermediate_size": _get(cfg, "intermediate_size"),
        "vocab_size": _get(cfg, "vocab_size"),
        "rope_theta": float(rope_theta) if rope_theta is not None else None,
        "max_position_embeddings": _get(cfg, "max_position_embeddings"),
    }
    return fp


def config_hash(model_or_config) -> str:
    """16 hex digits of sha256 over the architecture fields (model_fingerprint minus max positions)."""
    fp = model_fingerprint(model_or_config)
    payload = json.dumps({k: fp[k] for k in _HASHED_FIELDS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Table objects

@dataclass(frozen=True)
class LayerBits:
    layer: int
    key_bits: int
    value_bits: int
    key_budget_bytes: float
    value_budget_bytes: float
    n_sink: int
    window: int
    count_metadata: bool
    max_len: int
    body_init_bits: int
    key_schedule: tuple = ()      # ((tokens, bits), ...) for max_len tokens
    value_schedule: tuple = ()
    alpha: float | None = None

    def cache_config(self, n_kv_heads: int, head_dim: int) -> CacheConfig:
        return CacheConfig(n_kv_heads=n_kv_heads, head_dim=head_dim, n_sink=self.n_sink, window=self.window,
                           body_init_bits=self.body_init_bits, count_metadata=self.count_metadata)


@dataclass(frozen=True)
class BitWidthTable:
    path: Path | None
    model_id: str
    model: dict                      # the table's "model" section (fingerprint + id + config_hash)
    n_sink: int
    window: int
    body_init_bits: int
    count_metadata: bool
    max_len: int
    layers: tuple                    # LayerBits per layer, in layer order
    allocation: dict
    reparam_path: Path | None        # absolute path of the factors file, or None (no reparameterisation)
    reparam_alphas: tuple | None
    calibration: dict
    raw: dict = field(repr=False, compare=False, default_factory=dict)
    rotation: str = "none"           # KV rotation applied on the host (host/rotation.py): "none" or "hadamard"

    @property
    def config_hash(self) -> str:
        return self.model["config_hash"]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_kv_heads(self) -> int:
        return self.model["num_key_value_heads"]

    @property
    def head_dim(self) -> int:
        return self.model["head_dim"]

    @property
    def key_bits(self) -> list[int]:
        return [lb.key_bits for lb in self.layers]

    @property
    def value_bits(self) -> list[int]:
        return [lb.value_bits for lb in self.layers]

    @property
    def key_budget_bytes(self) -> list[float]:
        return [lb.key_budget_bytes for lb in self.layers]

    @property
    def value_budget_bytes(self) -> list[float]:
        return [lb.value_budget_bytes for lb in self.layers]

    def cache_config(self, layer: int = 0) -> CacheConfig:
        return self.layers[layer].cache_config(self.n_kv_heads, self.head_dim)

    def layer_caches(self) -> list[LayerKVCache]:
        """One fresh LayerKVCache per layer with the table's budgets."""
        return [LayerKVCache(self.cache_config(i), lb.key_budget_bytes, lb.value_budget_bytes)
                for i, lb in enumerate(self.layers)]

    def total_budget_bytes(self) -> float:
        return sum(self.key_budget_bytes) + sum(self.value_budget_bytes)

    def to_dict(self) -> dict:
        return self.raw


# ----------------------------------------------------------------------------------------------------------
# Loading / saving

@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def default_table_path(model_id: str = DEFAULT_MODEL_ID) -> Path:
    """Where calibration writes (and the repository ships) the table of `model_id`."""
    return TABLES_DIR / f"{model_id}.json"


def validate_table_dict(data: dict, where: str = "table") -> None:
    """Schema validation plus the consistency checks the schema cannot express. Raises TableError."""
    import jsonschema
    if not isinstance(data, dict):
        raise TableError(f"{where}: the top level must be a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise TableError(f"{where}: not a PM-KVQ bit-width table (format {data.get('format')!r}, expected {FORMAT!r})")
    if data.get("version") != VERSION:
        raise TableError(f"{where}: unsupported table version {data.get('version')!r} (this code reads version "
                         f"{VERSION}); re-run calib/calibrate.py")
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        lines = [f"  at /{'/'.join(str(p) for p in e.path)}: {e.message}" for e in errors[:10]]
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise TableError(f"{where} does not match the bit-width table schema:\n" + "\n".join(lines) + more)
    m, c, layers = data["model"], data["cache"], data["layers"]
    if len(layers) != m["num_hidden_layers"]:
        raise TableError(f"{where}: {len(layers)} layer entries for a model with {m['num_hidden_layers']} layers")
    if [lb["layer"] for lb in layers] != list(range(len(layers))):
        raise TableError(f"{where}: layer entries must be numbered 0..{len(layers) - 1} in order")
    for lb in layers:
        cfg = CacheConfig(m["num_key_value_heads"], m["head_dim"], lb["n_sink"], lb["window"],
                          c["body_init_bits"], c["count_metadata"])
        for kind in ("key", "value"):
            budget, bits = lb[f"{kind}_budget_bytes"], lb[f"{kind}_bits"]
            try:
                sched = shrink_schedule(cfg, budget, c["max_len"])
            except BudgetError as e:
                raise TableError(f"{where}: layer {lb['layer']} {kind} budget cannot hold max_len="
                                 f"{c['max_len']} tokens: {e}") from None
            final = sched[-1][1] if sched else c["body_init_bits"]
            if final != bits:
                raise TableError(f"{where}: layer {lb['layer']} {kind}_bits={bits} but its budget of {budget} bytes "
                                 f"ends at {final} bits after {c['max_len']} tokens")
            stored = [(e["tokens"], e["bits"]) for e in lb[f"{kind}_schedule"]]
            if stored != [tuple(e) for e in sched]:
                raise TableError(f"{where}: layer {lb['layer']} {kind}_schedule {stored} differs from the schedule "
                                 f"the cache derives from its budget {sched}")
    if c.get("rotation", "none") == "hadamard" and m["head_dim"] & (m["head_dim"] - 1):
        raise TableError(f"{where}: cache.rotation 'hadamard' needs a power-of-two head_dim, the table's model has "
                         f"head_dim {m['head_dim']}")
    if data["reparam"] is not None and len(data["reparam"]["alphas"]) != len(layers):
        raise TableError(f"{where}: reparam.alphas has {len(data['reparam']['alphas'])} entries for "
                         f"{len(layers)} layers")


def check_model(table: BitWidthTable, model_or_config) -> None:
    """Raise TableMismatchError listing every field where the table and the model disagree."""
    fp = model_fingerprint(model_or_config)
    fp["config_hash"] = config_hash(model_or_config)
    diffs = []
    for k in ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "hidden_size", "config_hash"):
        if table.model.get(k) != fp.get(k):
            diffs.append(f"{k}: table has {table.model.get(k)!r}, model has {fp.get(k)!r}")
    mp = fp.get("max_position_embeddings")
    if mp is not None and table.max_len > mp:
        diffs.append(f"max_len: table budgets {table.max_len} tokens, the model supports {mp} positions")
    if diffs:
        name = f" ({table.path})" if table.path else ""
        raise TableMismatchError(f"bit-width table for model {table.model_id!r}{name} does not match the loaded "
                                 f"model:\n  " + "\n  ".join(diffs) +
                                 "\nre-run calib/calibrate.py for this model, or load the table made for it")


def table_from_dict(data: dict, path: Path | None = None, model_config=None) -> BitWidthTable:
    where = str(path) if path else "table"
    validate_table_dict(data, where)
    c, m = data["cache"], data["model"]
    layers = tuple(
        LayerBits(layer=lb["layer"], key_bits=lb["key_bits"], value_bits=lb["value_bits"],
                  key_budget_bytes=float(lb["key_budget_bytes"]), value_budget_bytes=float(lb["value_budget_bytes"]),
                  n_sink=lb["n_sink"], window=lb["window"], count_metadata=c["count_metadata"], max_len=c["max_len"],
                  body_init_bits=c["body_init_bits"],
                  key_schedule=tuple((e["tokens"], e["bits"]) for e in lb["key_schedule"]),
                  value_schedule=tuple((e["tokens"], e["bits"]) for e in lb["value_schedule"]),
                  alpha=lb.get("alpha"))
        for lb in data["layers"])
    rp = data["reparam"]
    base = path.parent if path else Path.cwd()
    reparam_path = (base / rp["path"]).resolve() if rp else None
    table = BitWidthTable(
        path=path, model_id=m["id"], model=dict(m), n_sink=c["n_sink"], window=c["window"],
        body_init_bits=c["body_init_bits"], count_metadata=c["count_metadata"], max_len=c["max_len"], layers=layers,
        allocation=dict(data["allocation"]), reparam_path=reparam_path,
        reparam_alphas=tuple(rp["alphas"]) if rp else None, calibration=dict(data["calibration"]), raw=data,
        rotation=c.get("rotation", "none"))
    if model_config is not None:
        check_model(table, model_config)
    return table


def load_table(path=None, model_config=None) -> BitWidthTable:
    """Load and validate a bit-width table; if `model_config` (a transformers config, a model, or a dict) is
    given, also check that the table was made for that model. path=None loads default_table_path()."""
    path = Path(path) if path is not None else default_table_path()
    if not path.is_file():
        raise FileNotFoundError(f"bit-width table {path} not found (run `make calib` / python calib/calibrate.py)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TableError(f"{path} is not valid JSON: {e}") from None
    table = table_from_dict(data, path.resolve())
    if model_config is not None:
        check_model(table, model_config)
    return table


def save_table(data: dict, path) -> Path:
    """Validate `data` and write it as JSON (atomically). Returns the path."""
    path = Path(path)
    validate_table_dict(data, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Building a table from an allocation (used by calibration and tests)

def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def build_table_dict(model_or_config, *, model_id: str, key_budgets, value_budgets, max_len: int, n_sink: int = 1,
                     window: int = 128, body_init_bits: int = 16, count_metadata: bool = True,
                     allocation: dict | None = None, reparam: dict | None = None, calibration: dict | None = None,
                     sensitivity: dict | None = None, alphas=None, rotation: str = "none") -> dict:
    """Assemble a valid table dict from per-layer byte budgets (widths and schedules are derived)."""
    fp = model_fingerprint(model_or_config)
    n_layers = fp["num_hidden_layers"]
    if len(key_budgets) != n_layers or len(value_budgets) != n_layers:
        raise ValueError(f"need {n_layers} key and value budgets, got {len(key_budgets)} and {len(value_budgets)}")
    cfg = CacheConfig(fp["num_key_value_heads"], fp["head_dim"], n_sink, window, body_init_bits, count_metadata)
    layers, used_c, used_m = [], 0.0, 0.0
    for i in range(n_layers):
        entry = {"layer": i}
        for kind, budget in (("key", key_budgets[i]), ("value", value_budgets[i])):
            sched = shrink_schedule(cfg, budget, max_len)  # BudgetError if it cannot hold max_len tokens
            bits = sched[-1][1] if sched else body_init_bits
            entry[f"{kind}_bits"] = bits
            entry[f"{kind}_budget_bytes"] = _num(budget)
            entry[f"{kind}_schedule"] = [{"tokens": int(t), "bits": int(b)} for t, b in sched]
            used_c += budget_for_width(cfg, bits, max_len, metadata=False)
            used_m += budget_for_width(cfg, bits, max_len, metadata=True)
        entry["n_sink"], entry["window"] = n_sink, window
        entry["alpha"] = None if alphas is None else float(alphas[i])
        layers.append({k: entry[k] for k in ("layer", "key_bits", "value_bits", "key_budget_bytes",
                                             "value_budget_bytes", "n_sink", "window", "alpha", "key_schedule",
                                             "value_schedule")})
    total = float(sum(key_budgets) + sum(value_budgets))
    alloc = {"method": "manual", "widths": sorted({lb["key_bits"] for lb in layers} |
                                                  {lb["value_bits"] for lb in layers}, reverse=True),
             "separate_kv": any(lb["key_bits"] != lb["value_bits"] for lb in layers),
             "budget_bytes": _num(total), "budget_bytes_per_token": total / max_len}
    alloc.update(allocation or {})
    alloc["used_bytes_codes_only"] = _num(used_c)
    alloc["used_bytes_with_metadata"] = _num(used_m)
    data = {
        "format": FORMAT, "version": VERSION, "created_by": "pmkvq_accel.calib",
        "model": {"id": model_id, "config_hash": config_hash(model_or_config), **fp},
        "cache": {"n_sink": n_sink, "window": window, "body_init_bits": body_init_bits,
                  "count_metadata": count_metadata, "max_len": max_len,
                  **({"rotation": rotation} if rotation != "none" else {})},
        "allocation": alloc, "reparam": reparam, "calibration": calibration or {}, "layers": layers,
    }
    if sensitivity is not None:
        data["sensitivity"] = sensitivity
    validate_table_dict(data)
    return data


# ----------------------------------------------------------------------------------------------------------
# Key reparameterisation factors

def save_factors(path, factors, model_or_config, model_id: str) -> Path:
    """factors: list (per layer) of (n_kv_heads, head_dim) positive tensors/arrays (K is divided by them)."""
    import torch
    from safetensors.torch import save_file
    fp = model_fingerprint(model_or_config)
    tensors = {}
    for i, f in enumerate(factors):
        t = torch.as_tensor(f, dtype=torch.float32).contiguous()
        if t.shape != (fp["num_key_value_heads"], fp["head_dim"]):
            raise ValueError(f"layer {i} factors have shape {tuple(t.shape)}, expected "
                             f"({fp['num_key_value_heads']}, {fp['head_dim']})")
        tensors[f"layers.{i}.key_factors"] = t
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"model_id": model_id, "config_hash": config_hash(model_or_config),
                                            "format": "pmkvq-reparam-factors", "version": "1"})
    return path


def load_factors(table: BitWidthTable) -> list | None:
    """The per-layer factors (n_kv_heads, head_dim) as float32 tensors, or None if the table has none."""
    if table.reparam_path is None:
        return None
    from safetensors import safe_open
    if not table.reparam_path.is_file():
        raise FileNotFoundError(f"reparameterisation factors {table.reparam_path} (named by {table.path}) not found")
    with safe_open(str(table.reparam_path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("config_hash") != table.config_hash:
            raise TableMismatchError(f"{table.reparam_path} was made for config hash {meta.get('config_hash')!r}, "
                                     f"the table is for {table.config_hash!r}")
        out = []
        for i in range(table.n_layers):
            key = f"layers.{i}.key_factors"
            if key not in f.keys():
                raise TableError(f"{table.reparam_path} lacks {key}")
            t = f.get_tensor(key)
            if t.shape != (table.n_kv_heads, table.head_dim) or not bool((t > 0).all()) or \
                    not bool(t.isfinite().all()):
                raise TableError(f"{table.reparam_path}: {key} must be positive finite of shape "
                                 f"({table.n_kv_heads}, {table.head_dim}), got {tuple(t.shape)}")
            out.append(t)
    return out


def fold_factors(model, factors) -> None:
    """Fold key factors r (per layer, (n_kv_heads, head_dim)) into the projections, in place:
    k_proj rows (and bias) divided by r, q_proj rows (and bias) multiplied by r repeated over each GQA group.
    Q.K^T is unchanged (r is equal on each RoPE channel pair, so it commutes with the rotation)."""
    import torch
    fp = model_fingerprint(model)
    h_kv, hd, h_q = fp["num_key_value_heads"], fp["head_dim"], fp["num_attention_heads"]
    group = h_q // h_kv
    mods = attention_modules(model)
    if len(factors) != len(mods):
        raise ValueError(f"{len(factors)} factor sets for {len(mods)} layers")
    with torch.no_grad():
        for attn, r in zip(mods, factors):
            r = torch.as_tensor(r, dtype=torch.float64)
            if r.shape != (h_kv, hd):
                raise ValueError(f"factors must be ({h_kv}, {hd}), got {tuple(r.shape)}")
            half = hd // 2
            if not torch.equal(r[:, :half], r[:, half:2 * half]):
                raise ValueError("factors must be equal on each RoPE channel pair (i, i + head_dim/2)")
            rk = r.reshape(-1)                                    # (h_kv * hd,)
            rq = r.repeat_interleave(group, dim=0).reshape(-1)    # q head h uses kv head h // group
            for proj, scale in ((attn.k_proj, 1.0 / rk), (attn.q_proj, rq)):
                w = proj.weight
                w.copy_((w.double() * scale.to(w.device)[:, None]).to(w.dtype))
                if proj.bias is not None:
                    proj.bias.copy_((proj.bias.double() * scale.to(w.device)).to(proj.bias.dtype))


def apply_reparam(model, table: BitWidthTable):
    """Fold the table's key reparameterisation factors into `model` (in place, once). Returns the model.
    A table without factors leaves the model unchanged. Checks the table against the model first."""
    check_model(table, model)
    marker = getattr(model, "_pmkvq_reparam", None)
    if marker is not None:
        raise RuntimeError(f"reparameterisation factors were already applied to this model ({marker})")
    factors = load_factors(table)
    if factors is not None:
        fold_factors(model, factors)
    model._pmkvq_reparam = str(table.reparam_path) if factors is not None else "none"
    return model
