"""Decode a real LLM with every decode-step attention on the accelerator.

    python host/run.py                         # default model, its bit-width table, golden backend
    python host/run.py --board u280 --xclbin build/pmkvq_attn.xclbin
    python host/run.py --prompt-tokens 1024 --max-new-tokens 256 --ignore-eos     # the benchmark

Prints the generated text, KV memory against a float16 cache, each layer's final widths, agreement with the
float model on the same tokens (top-1 match, mean KL), tokens/s, and for the sim backend the kernel cycles per
token. Errors (no board, no .xclbin, a table for another model, a budget too small...) print one line and
exit with status 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: do not let host/*.py shadow top-level modules
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the golden kernel's matmuls are small: no BLAS thread pool
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep: no collapse on a busy machine
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402

DEFAULT_PROMPT = ("Explain in a few sentences how a key-value cache speeds up text generation in a transformer "
                  "language model, and why quantizing it saves memory.")


def parse_args(argv=None):
    from pmkvq_accel.host.device import BOARDS
    from pmkvq_accel.model.llm import DEFAULT_MODEL
    p = argparse.ArgumentParser(prog="python host/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model: {DEFAULT_MODEL} (default), a local Hugging Face folder or a .gguf file")
    p.add_argument("--table", default=None, help="bit-width table JSON (default: the model's committed table)")
    p.add_argument("--prompt", default=None, help="prompt text (sent through the chat template)")
    p.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                   help="instead of --prompt: a raw N-token prompt of Python documentation text (benchmarks)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--board", default="golden", choices=BOARDS, help="device backend (default: golden)")
    p.add_argument("--xclbin", default=None, help="kernel bitstream for --board u280")
    p.add_argument("--seed", type=int, default=0, help="seeds torch and NumPy (greedy decoding is deterministic)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice, one per core)")
    p.add_argument("--ignore-eos", action="store_true", help="decode exactly --max-new-tokens tokens")
    p.add_argument("--no-compare", action="store_true", help="skip the float-model agreement pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON")
    a = p.parse_args(argv)
    if a.prompt is not None and a.prompt_tokens is not None:
        p.error("give --prompt or --prompt-tokens, not both")
    if a.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if a.prompt_tokens is not None and a.prompt_tokens < 1:
        p.error("--prompt-tokens must be at least 1")
    return a


def build_prompt(tok, args) -> list:
    if args.prompt_tokens is not None:
        import pydoc_data.topics as topics
        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        ids = tok(text[: 8 * args.prompt_tokens + 1000]).input_ids[: args.prompt_tokens]
        if len(ids) < args.prompt_tokens:
            raise ValueError(f"could not build a {args.prompt_tokens}-token prompt")
        return ids
    text = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(text).input_ids


def runs(widths) -> str:
    """Per-layer (key, value) widths as runs: '0-11: 16/16, 12: 8/16, ...'."""
    out, start = [], 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or widths[i] != widths[start]:
            k, v = widths[start]
            out.append(f"{start}{f'-{i - 1}' if i - 1 > start else ''}: {k}/{v}")
            start = i
    return ", ".join(out)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv=None) -> int:
    args = parse_args(argv)
    from pmkvq_accel.host.device import open_device
    device = open_device(args.board, xclbin=args.xclbin)  # fails fast, before torch and the model load
    try:
        import torch

        from pmkvq_accel.host import table as host_table
        from pmkvq_accel.host.decode import float_agreement, greedy_decode
        from pmkvq_accel.host.hf import kv_cache_for
        from pmkvq_accel.model.llm import load_model, resolve_model_dir
        from transformers import AutoConfig
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        model_id = Path(args.model).stem if args.model.endswith(".gguf") else Path(args.model).name
        config = AutoConfig.from_pretrained(resolve_model_dir(args.model))  # check the table before the weights
        table, table_label = host_table.load_for_model(config, args.table, model_id)
        model, tok = load_model(args.model, device="cpu")
        reparam = host_table.apply_reparam(model, table)
        prompt = build_prompt(tok, args)
        total = len(prompt) + args.max_new_tokens
        if total > table.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max new tokens ({args.max_new_tokens}) = {total} "
                             f"exceeds the table's max_len {table.max_len}")
        kv = kv_cache_for(model, table, device)
        print(f"model {model_id} | table {table_label}{' | keys reparameterised' if reparam else ''} | "
              f"board {device.name} | prompt {len(prompt)} tokens", flush=True)
        res = greedy_decode(model, kv, prompt, args.max_new_tokens,
                            eos_id=None if args.ignore_eos else tok.eos_token_id, progress=not args.no_progress)
        metrics = report(args, tok, table, kv, res, device)
        if not args.no_compare:
            agree = float_agreement(model, res)
            metrics["agreement"] = agree
            print(f"float-model agreement over {agree['positions']} tokens: top-1 match "
                  f"{100 * agree['top1_match']:.1f}%, mean KL {agree['mean_kl']:.4f} (max {agree['max_kl']:.3f})")
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=1) + "\n")
    finally:
        device.close()
    return 0


def report(args, tok, table, kv, res, device) -> dict:
    text = tok.decode(res.new_ids, skip_special_tokens=True)
    print("\n--- generated text " + "-" * 50)
    print(text.strip())
    print("-" * 69)
    m_meta, m_codes, fp16 = kv.memory_bytes(True), kv.memory_bytes(False), kv.fp16_bytes()
    print(f"KV cache: {kv.tokens()} tokens x {kv.n_layers} layers: {fmt_bytes(m_meta)} with metadata, "
          f"{fmt_bytes(m_codes)} codes only, vs {fmt_bytes(fp16)} float16 "
          f"({100 * m_meta / fp16:.1f}% / {100 * m_codes / fp16:.1f}%); device memory reserved "
          f"{fmt_bytes(kv.device_bytes)} for max_len {kv.max_len}")
    widths = [kv.widths(i) for i in range(kv.n_layers)]
    final = [(lb.key_bits, lb.value_bits) for lb in table.layers]
    print(f"layer widths now (key/value body bits, by layer): {runs(widths)}; the table's at max_len "
          f"{table.max_len}: {runs(final)}")
    print(f"prefill {len(res.prompt_ids)} tokens in {res.prefill_s:.2f} s; decode {res.decode_steps} steps in "
          f"{res.decode_s:.2f} s = {res.tokens_per_s:.2f} tokens/s ({device.name} backend)")
    digest = hashlib.sha256(np.ascontiguousarray(res.logprobs).tobytes()).hexdigest()[:16]
    print(f"output digest {digest} (SHA-256 of every step's log-probabilities: equal digests on two boards = "
          f"bit-identical attention results)")
    metrics = {"board": device.name, "logprobs_sha256_16": digest, "prompt_tokens": len(res.prompt_ids), "new_tokens": len(res.new_ids),
               "tokens_per_s": res.tokens_per_s, "prefill_s": res.prefill_s, "decode_s": res.decode_s,
               "kv_bytes_with_metadata": m_meta, "kv_bytes_codes_only": m_codes, "fp16_bytes": fp16,
               "widths": widths, "text": text}
    if res.cycles_per_step:
        cyc = float(np.mean(res.cycles_per_step))
        mhz = device.kernel_clock_mhz
        print(f"kernel: {cyc:.0f} cycles per token (all {kv.n_layers} layers, ap_start to ap_done) -> "
              f"{cyc / mhz:.1f} us per token at {mhz:.0f} MHz on the U280 (kernel time only: no PCIe, no host)")
        metrics["cycles_per_token"] = cyc
    return metrics


def cli(argv=None) -> int:
    from pmkvq_accel.host.device import DeviceError, DeviceUnavailable
    from pmkvq_accel.model.cache import BudgetError
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DeviceUnavailable, DeviceError, BudgetError, FileNotFoundError, ValueError, NotImplementedError) as e:
        if os.environ.get("PMKVQ_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
