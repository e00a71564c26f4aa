"""The accelerator as a library: one call puts a transformers model's decode attention on the device.

    import pmkvq_accel
    acc = pmkvq_accel.accelerate(model, tokenizer)          # board="golden" by default
    out = model.generate(input_ids, max_new_tokens=64)      # every decode-step attention on the device
    print(acc.stats.summary())
    acc.close()                                             # or: with pmkvq_accel.accelerate(...) as acc: ...

`accelerate` loads and checks the bit-width table for the model (host/table.py), folds the table's key
reparameterisation factors into the model's q_proj/k_proj weights (in place; `close()` puts the original
weights back), opens the device, builds the device KV cache (host/kvcache.py) and replaces `model.generate`
with `Accelerator.generate` until `close()`. Each `generate` call decodes one sequence on a fresh device cache
through transformers' own `generate` (greedy or sampling, stopping criteria, streamers), passing the cache as
the current `cache=` argument; what it cannot do (batch > 1, beam search, assisted decoding, chunked prefill,
padding, a context beyond the table's max_len, a model family other than Llama/Qwen2) is refused with
`Unsupported` or `ContextTooLong` before anything runs.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pmkvq_accel.model.llm import SUPPORTED_MODEL_TYPES   # re-exported (__all__): the one list

from .kvcache import ContextTooLong, DeviceKVCache

__all__ = ["Accelerator", "ContextTooLong", "RunStats", "SUPPORTED_MODEL_TYPES", "StepRecorder", "Unsupported",
           "accelerate", "check_model", "fmt_bytes", "launch_counts", "model_id_of", "run_generate",
           "step_logprobs", "width_runs"]


class Unsupported(NotImplementedError):
    """A model, or a generate() request, the accelerator cannot serve (the message says which and why)."""


# ---------------------------------------------------------------------------------------------------------
# small helpers

def model_id_of(name_or_path) -> str:
    """The model id a bit-width table is named after: the model folder's name (a .gguf file's stem)."""
    p = Path(str(name_or_path))
    return p.stem if p.suffix == ".gguf" else p.name


def check_model(model) -> None:
    """Raise Unsupported unless `model` is a Llama/Qwen2-family causal LM with generate()."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise Unsupported(f"model type {mtype!r} is not supported: the accelerator hooks the attention of "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} models")
    if not callable(getattr(type(model), "generate", None)):
        raise Unsupported(f"{type(model).__name__} has no generate(): load it with AutoModelForCausalLM")
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise Unsupported("sliding-window attention is not supported: the device attends over the whole cache")


def step_logprobs(logits) -> np.ndarray:
    """One step's next-token log-probabilities as the digest and the agreement pass see them (float32)."""
    import torch
    return torch.log_softmax(logits.detach().double(), -1).float().cpu().numpy()


def launch_counts(device) -> dict | None:
    """Kernel launches so far: per op and 'total' where the backend counts them per op (golden), 'total' only
    where it counts them (sim), None where it does not (u280)."""
    counts = getattr(device, "launch_counts", None)
    if callable(counts):
        out = dict(counts())
    elif isinstance(getattr(getattr(device, "kernel", None), "launches", None), dict):
        out = dict(device.kernel.launches)          # golden: GoldenKernel counts every executed launch by op
    elif callable(getattr(getattr(device, "sim", None), "counters", None)):
        n = device.sim.counters().get("launches")    # sim: the harness counts ap_starts
        return None if n is None else {"total": int(n)}
    else:
        return None
    out.setdefault("total", sum(v for k, v in out.items() if k != "total"))
    return out


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def width_runs(widths) -> str:
    """Per-layer (key, value) widths as runs: '0-11: 16/16, 12: 8/16, ...'."""
    out, start = [], 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or tuple(widths[i]) != tuple(widths[start]):
            k, v = widths[start]
            out.append(f"{start}{f'-{i - 1}' if i - 1 > start else ''}: {k}/{v}")
            start = i
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------------------
# what one generate() did

class StepRecorder:
    """Forward hooks on a causal LM that time each forward (the first is the prefill), count the device's
    kernel cycles of each decode forward, digest every step's next-token log-probabilities and optionally keep
    them. Used for accelerated and float runs alike (device=None)."""

    def __init__(self, device=None, keep_logprobs: bool = False, progress_total: int | None = None):
        self.device, self.keep_logprobs = device, keep_logprobs
        self.progress_total = progress_total
        self.logprobs: list = []
        self.cycles_per_step: list = []
        self.forwards = 0
        self.prefill_s = self.decode_s = self.decode_cpu_s = 0.0
        self._sha = hashlib.sha256()
        self._bar = None
        self._t = self._c = self._cyc = None
        self._first_end = None

    @property
    def decode_steps(self) -> int:
        return max(self.forwards - 1, 0)

    @property
    def digest(self) -> str:
        """SHA-256 (first 16 hex digits) of every step's float32 log-probabilities, in order: equal digests on
        two boards = bit-identical attention results."""
        return self._sha.hexdigest()[:16]

    def _pre(self, module, args, kwargs):
        self._t, self._c = time.perf_counter(), time.process_time()
        self._cyc = self.device.cycles() if self.device is not None and self.forwards else None

    def _post(self, module, args, kwargs, output):
        t, c = time.perf_counter(), time.process_time()
        if self.forwards == 0:
            self.prefill_s, self._first_end = t - self._t, (t, c)
        else:
            self.decode_s, self.decode_cpu_s = t - self._first_end[0], c - self._first_end[1]
            if self._cyc is not None:
                self.cycles_per_step.append(self.device.cycles() - self._cyc)
        self.forwards += 1
        lp = step_logprobs(output.logits[0, -1])
        self._sha.update(np.ascontiguousarray(lp).tobytes())
        if self.keep_logprobs:
            self.logprobs.append(lp)
        if self._bar is not None:
            self._bar.update(1)

    @contextmanager
    def attached(self, model):
        from tqdm.auto import tqdm
        handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                   model.register_forward_hook(self._post, with_kwargs=True)]
        if self.progress_total:
            self._bar = tqdm(total=self.progress_total, desc="decoding", unit="tok", leave=False)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            if self._bar is not None:
                self._bar.close()
                self._bar = None


@dataclass
class RunStats:
    """What the last `generate` did on the device. Memory is what the cache holds for these tokens (codes, and
    codes + bf16 scale/zero metadata) against a float16 cache of the same tokens; `device_bytes` is the device
    memory reserved for the table's max_len."""
    board: str
    prompt_tokens: int
    new_tokens: int
    tokens: int                     # tokens the device cache holds at the end (prompt + new - 1)
    kv_bytes_with_metadata: float
    kv_bytes_codes_only: float
    fp16_bytes: int
    device_bytes: int
    max_len: int
    widths: list                    # per layer: (key body bits, value body bits) at the end
    launches: dict | None           # kernel launches of this run (per op where the backend counts them)
    cycles: int | None              # kernel cycles of this run's decode steps (sim), else None
    cycles_per_step: list
    digest: str                     # StepRecorder.digest
    prefill_s: float
    decode_s: float
    decode_cpu_s: float
    decode_steps: int
    kernel_clock_mhz: float | None = None
    logprobs: np.ndarray | None = field(default=None, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def cycles_per_token(self) -> float | None:
        return float(np.mean(self.cycles_per_step)) if self.cycles_per_step else None

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "logprobs"}
        d["widths"] = [list(w) for w in self.widths]
        d["tokens_per_s"] = self.tokens_per_s
        if self.cycles_per_token is not None:
            d["cycles_per_token"] = self.cycles_per_token
        return d

    def summary(self) -> str:
        n_layers = len(self.widths)
        m, c, f = self.kv_bytes_with_metadata, self.kv_bytes_codes_only, self.fp16_bytes
        lines = [
            f"KV cache: {self.tokens} tokens x {n_layers} layers: {fmt_bytes(m)} with metadata, {fmt_bytes(c)} "
            f"codes only, vs {fmt_bytes(f)} float16 ({100 * m / f:.1f}% / {100 * c / f:.1f}%); device memory "
            f"reserved {fmt_bytes(self.device_bytes)} for max_len {self.max_len}",
            f"layer widths now (key/value body bits, by layer): {width_runs(self.widths)}",
            f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.2f} s; decode {self.decode_steps} steps in "
            f"{self.decode_s:.2f} s = {self.tokens_per_s:.2f} tokens/s ({self.board} backend)",
        ]
        if self.launches is not None:
            per_op = ", ".join(f"{k} {v}" for k, v in self.launches.items() if k != "total")
            lines.append(f"device launches: {self.launches['total']}" + (f" ({per_op})" if per_op else ""))
        lines.append(f"output digest {self.digest} (SHA-256 of every step's log-probabilities: equal digests on "
                     f"two boards = bit-identical attention results)")
        if self.cycles_per_token is not None:
            cyc, mhz = self.cycles_per_token, self.kernel_clock_mhz
            line = f"kernel: {cyc:.0f} cycles per token (all {n_layers} layers, ap_start to ap_done)"
            if mhz:
                line += (f" -> {cyc / mhz:.1f} us per token at {mhz:.0f} MHz on the U280 (kernel time only: no "
                         f"PCIe, no host)")
            lines.append(line)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# one generate() on one device cache

def _setting(model, kwargs, name):
    """A generate() setting as transformers resolves it: the keyword, else generation_config's, else the
    model's default generation config."""
    if name in kwargs:
        return kwargs[name]
    for cfg in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        if cfg is not None and getattr(cfg, name, None) is not None:
            return getattr(cfg, name)
    return None


def _check_request(model, kv: DeviceKVCache, args, kwargs) -> tuple[int, int]:
    """(prompt tokens, max new tokens) of a generate() request, or Unsupported / ContextTooLong / ValueError."""
    import torch
    for name in ("cache", "past_key_values", "cache_params"):
        if kwargs.get(name) is not None:
            raise Unsupported(f"generate({name}=...): the accelerator supplies the cache (its device KV cache)")
    if kwargs.get("inputs_embeds") is not None:
        raise Unsupported("generate(inputs_embeds=...) is not supported: pass input_ids")
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if ids is None:
        raise ValueError("generate() needs the prompt's input_ids (a (1, T) tensor)")
    ids = torch.as_tensor(ids)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a (1, T) tensor with T >= 1, got shape {tuple(ids.shape)}")
    if ids.shape[0] != 1:
        raise Unsupported(f"batch size {ids.shape[0]}: the accelerator decodes one sequence at a time; call "
                          f"generate once per prompt")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise Unsupported("an attention_mask with padding is not supported: the device attends over every "
                          "cached token")
    for name, what in (("num_beams", "beam search"), ("num_return_sequences", "several sequences per prompt")):
        if (_setting(model, kwargs, name) or 1) > 1:
            raise Unsupported(f"{name} > 1 ({what}) is not supported: the device cache holds one sequence")
    for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        if _setting(model, kwargs, name):
            raise Unsupported(f"{name}: assisted decoding is not supported (the device cache cannot drop tokens)")
    if _setting(model, kwargs, "prefill_chunk_size"):
        raise Unsupported("chunked prefill (prefill_chunk_size) is not supported: the prompt goes in one forward")
    if _setting(model, kwargs, "cache_implementation"):
        raise Unsupported("cache_implementation is not supported: the accelerator supplies its device cache")
    if _setting(model, kwargs, "use_cache") is False:
        raise Unsupported("use_cache=False is not supported: decoding on the device needs its KV cache")
    if kv.tokens() != 0:
        raise ValueError(f"this device cache already holds {kv.tokens()} tokens: one sequence per cache")
    t = int(ids.shape[1])
    new = _setting(model, kwargs, "max_new_tokens")
    if new is None:
        new = (_setting(model, kwargs, "max_length") or 20) - t
    new = int(new)
    if t + new > kv.max_len:
        raise ContextTooLong(f"prompt ({t} tokens) + max_new_tokens ({new}) = {t + new} exceeds the bit-width "
                             f"table's max_len {kv.max_len} (the device cache is sized for it)")
    return t, new


def run_generate(model, kv: DeviceKVCache, generate, args=(), kwargs=None, keep_logprobs: bool = False,
                 progress: bool = False):
    """transformers' `generate(*args, **kwargs)` (the unpatched bound method) with every decode-step attention
    through `kv`, a fresh device cache. Returns (generate's output, RunStats)."""
    import torch

    from .hf import DeviceCache, accelerated
    kwargs = dict(kwargs or {})
    prompt, new = _check_request(model, kv, args, kwargs)
    if kwargs.get("attention_mask") is None:
        # no padding (checked): never let generate infer a padding mask from a pad token inside the prompt
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        kwargs["attention_mask"] = torch.ones_like(torch.as_tensor(ids))
    device = kv.device
    before = launch_counts(device)
    rec = StepRecorder(device, keep_logprobs=keep_logprobs, progress_total=new if progress else None)
    with accelerated(model, kv), rec.attached(model):   # generate itself runs under torch.no_grad
        out = generate(*args, cache=DeviceCache(kv), **kwargs)
    after = launch_counts(device)
    launches = None if after is None else {k: v - (before or {}).get(k, 0) for k, v in after.items()}
    seq = out.sequences if hasattr(out, "sequences") else out
    stats = RunStats(
        board=device.name, prompt_tokens=prompt, new_tokens=int(seq.shape[-1]) - prompt, tokens=kv.tokens(),
        kv_bytes_with_metadata=kv.memory_bytes(True), kv_bytes_codes_only=kv.memory_bytes(False),
        fp16_bytes=kv.fp16_bytes(), device_bytes=kv.device_bytes, max_len=kv.max_len,
        widths=[tuple(kv.widths(i)) for i in range(kv.n_layers)], launches=launches,
        cycles=int(sum(rec.cycles_per_step)) if rec.cycles_per_step else None, cycles_per_step=rec.cycles_per_step,
        digest=rec.digest, prefill_s=rec.prefill_s, decode_s=rec.decode_s, decode_cpu_s=rec.decode_cpu_s,
        decode_steps=rec.decode_steps, kernel_clock_mhz=getattr(device, "kernel_clock_mhz", None),
        logprobs=np.stack(rec.logprobs) if keep_logprobs and rec.logprobs else None)
    return out, stats


# ---------------------------------------------------------------------------------------------------------
# the public entry point

# calib/table.py's apply_reparam marks a model it folded factors into (once only) with this attribute.
_REPARAM_MARK = "_pmkvq_reparam"
_ACTIVE_MARK = "_pmkvq_accelerator"


class Accelerator:
    """A model with its decode attention on the device. Made by `accelerate()`; see the module docstring.

    Attributes: model, tokenizer, device, table, table_label, reparam_folded (the factors were folded into the
    weights), kv (the device cache of the last or next run), stats (RunStats of the last run, else None)."""

    def __init__(self, model, tokenizer, device, table, table_label: str, own_device: bool, fold: bool,
                 progress: bool = False):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.table, self.table_label, self.progress = table, table_label, progress
        self.stats: RunStats | None = None
        self.text: str | None = None
        self.reparam_folded = False
        self._own_device, self._saved, self._closed = own_device, [], False
        try:
            if fold:
                self._fold()
            self.kv = self.new_cache()  # builds (sim) / opens the kernel now: errors before any generate
        except BaseException:
            self.close()
            raise
        self._generate = model.generate              # the class's bound generate (transformers)
        model.generate = self.generate
        setattr(model, _ACTIVE_MARK, self)

    # -- the reparameterisation: folded in place, undone by close() ------------------------------------------
    def _fold(self) -> None:
        import torch

        from pmkvq_accel.model.llm import attention_modules

        from . import table as host_table
        if getattr(self.table, "reparam_path", None) is None:
            return
        params = [p for m in attention_modules(self.model) for p in m.parameters()]
        saved = [(p, p.detach().clone()) for p in params]
        try:
            self.reparam_folded = host_table.apply_reparam(self.model, self.table)
        except RuntimeError as e:  # already folded: by hand, or by an accelerator not closed
            raise ValueError(f"{e}: pass fold=False if the model already holds this table's factors") from None
        with torch.no_grad():
            self._saved = [(p, old) for p, old in saved if not torch.equal(p, old)]

    def _unfold(self) -> None:
        import torch
        if not self.reparam_folded:
            return
        with torch.no_grad():
            for p, old in self._saved:
                p.copy_(old)
        self._saved = []
        self.model.__dict__.pop(_REPARAM_MARK, None)
        self.reparam_folded = False

    # -- decoding ----------------------------------------------------------------------------------------------
    def new_cache(self) -> DeviceKVCache:
        """A fresh device KV cache for one sequence (generate() makes one per call)."""
        from .hf import kv_cache_for
        return kv_cache_for(self.model, self.table, self.device)

    def generate(self, *args, **kwargs):
        """transformers' `model.generate` with every decode-step attention on the device (one sequence, on a
        fresh device cache); `self.stats` describes the run afterwards."""
        if self._closed:
            raise RuntimeError("this accelerator is closed: call pmkvq_accel.accelerate(model) again")
        if self.kv.tokens():
            self.kv = self.new_cache()
        out, self.stats = run_generate(self.model, self.kv, self._generate, args, kwargs, progress=self.progress)
        if self.tokenizer is not None:
            seq = out.sequences if hasattr(out, "sequences") else out
            self.text = self.tokenizer.decode(seq[0, self.stats.prompt_tokens:], skip_special_tokens=True)
        return out

    # -- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Give `model.generate` back to transformers, restore the original weights, close the device if this
        accelerator opened it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        model = self.model
        if model.__dict__.get("generate") == self.generate:
            del model.generate
        if model.__dict__.get(_ACTIVE_MARK) is self:
            del model.__dict__[_ACTIVE_MARK]
        self._unfold()
        if self._own_device:
            self.device.close()

    def __enter__(self) -> "Accelerator":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "active"
        return (f"<Accelerator {state}: {type(self.model).__name__} on {self.device.name}, table "
                f"{self.table_label}{', keys reparameterised' if self.reparam_folded else ''}>")


def accelerate(model, tokenizer=None, board="golden", table=None, xclbin=None, *, fold: bool = True,
               progress: bool = False) -> Accelerator:
    """Put `model`'s decode attention on the accelerator; returns an `Accelerator` (also a context manager).

    model:     a transformers Llama/Qwen2-family causal LM (e.g. from AutoModelForCausalLM or
               pmkvq_accel.model.llm.load_model), batch size 1.
    tokenizer: optional; when given, `acc.text` holds the last run's generated text.
    board:     "golden" (bit-exact NumPy model, default), "sim" (the kernel RTL on Verilator), "u280", or an open
               `pmkvq_accel.host.device.Device` (then the caller closes it).
    table:     bit-width table: a path, a loaded table, or None for the model's committed table (else a
               labelled built-in fallback).
    xclbin:    the kernel bitstream for board="u280".
    fold:      fold the table's key reparameterisation factors into q_proj/k_proj (in place; `close()`
               restores the original weights). fold=False: the model already holds them, nothing is changed.
    progress:  show a tqdm bar while decoding.

    Until `close()` (or the end of the `with` block), `model.generate(...)` decodes on the device."""
    from .device import Device, open_device
    check_model(model)
    if getattr(model, _ACTIVE_MARK, None) is not None:
        raise ValueError(f"this model is already accelerated ({getattr(model, _ACTIVE_MARK)!r}): close() that "
                         f"accelerator first")
    from pmkvq_accel.model.llm import attention_modules

    from . import table as host_table
    n_layers = len(attention_modules(model))
    if table is None or isinstance(table, (str, Path)):
        table, label = host_table.load_for_model(model.config, table, model_id_of(model.config.name_or_path))
    else:
        label = getattr(table, "label", "") or str(getattr(table, "path", "") or "table")
    if len(table.layers) != n_layers:
        raise ValueError(f"the bit-width table has {len(table.layers)} layers, the model {n_layers}")
    own = not isinstance(board, Device)
    device = open_device(board, xclbin=xclbin) if own else board
    return Accelerator(model, tokenizer, device, table, label, own_device=own, fold=fold, progress=progress)
