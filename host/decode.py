"""Greedy decoding of a transformers model on a given device KV cache (transformers' `generate`, through
host/accel.py's `run_generate`), and its agreement with the float model on the same tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .accel import RunStats, run_generate, step_logprobs
from .kvcache import DeviceKVCache


@dataclass
class DecodeResult:
    prompt_ids: list
    new_ids: list
    logprobs: np.ndarray          # (new tokens, vocab) float32: the accelerated model's next-token log-probs
    prefill_s: float
    decode_s: float               # time of the decode steps (one forward each), after the prefill
    decode_steps: int
    decode_cpu_s: float = float("nan")  # process CPU time of the decode steps (all threads)
    cycles_per_step: list = field(default_factory=list)
    stats: RunStats | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def greedy_decode(model, kv: DeviceKVCache, prompt_ids, max_new_tokens: int, eos_id=None,
                  progress: bool = True) -> DecodeResult:
    """Prefill the prompt (float attention, cache filled with quantized KV), then decode greedily with every
    attention on the device. Stops after max_new_tokens or at eos_id (None: never)."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).view(1, -1)
    if ids.shape[1] < 1 or max_new_tokens < 1:
        raise ValueError("need a non-empty prompt and at least one new token")
    generate = type(model).generate.__get__(model)   # transformers' own, even while an Accelerator is active
    out, st = run_generate(model, kv, generate, kwargs=dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos_id), keep_logprobs=True, progress=progress)
    return DecodeResult(list(map(int, ids[0])), [int(t) for t in out[0, ids.shape[1]:]], st.logprobs,
                        st.prefill_s, st.decode_s, st.decode_steps, st.decode_cpu_s, st.cycles_per_step, st)


def float_agreement(model, prompt_ids, new_ids, logprobs) -> dict:
    """Teacher-forced float model on prompt + generated tokens: top-1 match rate of the accelerated greedy
    tokens against the float model's argmax, and mean KL(float || accelerated) of the next-token
    distributions, over the generated positions. `logprobs`: (len(new_ids), vocab), as `step_logprobs` makes
    them."""
    n = len(new_ids)
    ids = torch.tensor([list(prompt_ids) + list(new_ids)[:-1]])
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=n).logits[0]
    ref = torch.log_softmax(logits.double(), -1)
    acc = torch.from_numpy(np.asarray(logprobs)).double()
    kl = (ref.exp() * (ref - acc)).sum(-1)
    match = (ref.argmax(-1) == torch.tensor(list(new_ids))).double()
    return {"top1_match": float(match.mean()), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "positions": n}


__all__ = ["DecodeResult", "float_agreement", "greedy_decode", "step_logprobs"]
