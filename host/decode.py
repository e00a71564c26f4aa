"""Greedy decoding of a transformers model with attention on the accelerator, and its agreement with the float
model on the same tokens."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .hf import DeviceCache, accelerated
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

    @property
    def tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def greedy_decode(model, kv: DeviceKVCache, prompt_ids, max_new_tokens: int, eos_id=None,
                  progress: bool = True) -> DecodeResult:
    """Prefill the prompt (float attention, cache filled with quantized KV), then decode greedily with every
    attention on the device. Stops after max_new_tokens or at eos_id (None: never)."""
    from tqdm import tqdm
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).view(1, -1)
    if ids.shape[1] < 1 or max_new_tokens < 1:
        raise ValueError("need a non-empty prompt and at least one new token")
    cache = DeviceCache(kv)
    new, logps, cycles = [], [], []
    with torch.inference_mode(), accelerated(model, kv):
        t0 = time.perf_counter()
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        prefill_s = time.perf_counter() - t0
        bar = tqdm(total=max_new_tokens, desc="decoding", unit="tok", disable=not progress, leave=False)
        t1, c1, steps = time.perf_counter(), time.process_time(), 0
        while True:
            logps.append(torch.log_softmax(logits.double(), -1).float().numpy())
            tok = int(logits.argmax())
            new.append(tok)
            bar.update(1)
            if len(new) >= max_new_tokens or (eos_id is not None and tok == eos_id):
                break
            c0 = kv.device.cycles()
            logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
            steps += 1
            if c0 is not None:
                cycles.append(kv.device.cycles() - c0)
        decode_s, decode_cpu_s = time.perf_counter() - t1, time.process_time() - c1
        bar.close()
    return DecodeResult(list(map(int, ids[0])), new, np.stack(logps), prefill_s, decode_s, steps, decode_cpu_s,
                        cycles)


def float_agreement(model, result: DecodeResult) -> dict:
    """Teacher-forced float model on prompt + generated tokens: top-1 match rate of the accelerated greedy
    tokens against the float model's argmax, and mean KL(float || accelerated) of the next-token
    distributions, over the generated positions."""
    n = len(result.new_ids)
    ids = torch.tensor([result.prompt_ids + result.new_ids[:-1]])
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=n).logits[0]
    ref = torch.log_softmax(logits.double(), -1)
    acc = torch.from_numpy(result.logprobs).double()
    kl = (ref.exp() * (ref - acc)).sum(-1)
    match = (ref.argmax(-1) == torch.tensor(result.new_ids)).double()
    return {"top1_match": float(match.mean()), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "positions": n}
