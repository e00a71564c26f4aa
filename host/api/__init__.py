"""pmkvq_accel: a mixed-precision KV-cache decode-attention accelerator for Alveo FPGAs, as a library.

    import pmkvq_accel
    acc = pmkvq_accel.accelerate(model, tokenizer)        # board="golden" | "sim" | "u280"
    out = model.generate(input_ids, max_new_tokens=64)    # decode attention on the device
    print(acc.stats.summary())
    acc.close()                                           # or use it as a context manager

The implementation is pmkvq_accel.host.accel (host/accel.py); this package (host/api/, mapped onto the name
`pmkvq_accel` in pyproject.toml) only re-exports it, lazily, so `import pmkvq_accel` loads neither NumPy nor
torch. The repository's folders are its subpackages: pmkvq_accel.model, .hw, .sim, .host, .calib.
"""
from importlib import import_module

_EXPORTS = {name: "pmkvq_accel.host.accel" for name in
            ("accelerate", "Accelerator", "RunStats", "Unsupported", "ContextTooLong", "SUPPORTED_MODEL_TYPES")}
_EXPORTS.update({name: "pmkvq_accel.host.device" for name in ("BOARDS", "DeviceError", "DeviceUnavailable")})
_EXPORTS["BudgetError"] = "pmkvq_accel.model.cache"

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pmkvq_accel' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
