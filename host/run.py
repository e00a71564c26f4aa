"""Decode a real LLM with every decode-step attention on the accelerator.

    python host/run.py                         # default model, its bit-width table, golden backend, a 1280-token
                                               # document prompt: the cache reaches the compressed regime
    python host/run.py --board u280 --xclbin build/pmkvq_attn.xclbin
    python host/run.py --prompt-tokens 1024 --max-new-tokens 256 --ignore-eos     # the benchmark

Prints the generated text, KV memory against a float16 cache, each layer's final widths, agreement with the
float model on the same tokens (top-1 match, mean KL), tokens/s, device launches, the output digest, and for the
sim backend the kernel cycles per token. Errors (no board, no .xclbin, a table for another model, a budget too
small...) print one line and exit with status 2. Installed, the same command is `pmkvq-run`. It decodes with
`pmkvq_accel.accelerate` and transformers' `model.generate`, as a user's own code would (README).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the golden kernel's matmuls are small: no BLAS thread pool
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep: no collapse on a busy machine
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402

DEFAULT_PROMPT_TOKENS = 1280  # default prompt (no --prompt): long enough that the layers shrink under the table


def at_least(low: int):
    """argparse type: an integer >= low (so 0 threads or 0 new tokens are usage errors, not deep failures)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def check_output_path(p: argparse.ArgumentParser, option: str, path) -> None:
    """Fail at once, not after the whole run, when an output file cannot be written there."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        p.error(f"{option} {path}: folder {Path(path).parent} does not exist")


def parse_args(argv=None):
    from pmkvq_accel.host.device import BOARDS, DEFAULT_ENGINES
    from pmkvq_accel.hw.regmap import MAX_ENGINES
    from pmkvq_accel.model.llm import DEFAULT_MODEL
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model: {DEFAULT_MODEL} (default), a local Hugging Face folder or a .gguf file")
    p.add_argument("--table", default=None, help="bit-width table JSON (default: the model's committed table)")
    p.add_argument("--prompt", default=None, help="prompt text (sent through the chat template)")
    p.add_argument("--prompt-tokens", type=at_least(1), default=None, metavar="N",
                   help="instead of --prompt: a raw N-token prompt of Python documentation text (default "
                        f"{DEFAULT_PROMPT_TOKENS} when no --prompt is given)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=64)
    p.add_argument("--board", default="golden", choices=BOARDS, help="device backend (default: golden)")
    p.add_argument("--xclbin", default=None, help="kernel bitstream for --board u280")
    p.add_argument("--engines", type=at_least(1), default=None, metavar="N",
                   help=f"engines the KV cache is striped over, golden and sim (default {DEFAULT_ENGINES}; "
                        "the u280 kernel reports its own)")
    p.add_argument("--seed", type=at_least(0), default=0,
                   help="seeds torch and NumPy (greedy decoding is deterministic)")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="torch threads (default: torch's choice, one per core)")
    p.add_argument("--ignore-eos", action="store_true", help="decode exactly --max-new-tokens tokens")
    p.add_argument("--no-compare", action="store_true", help="skip the float-model agreement pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON")
    a = p.parse_args(argv)
    if a.prompt is not None and a.prompt_tokens is not None:
        p.error("give --prompt or --prompt-tokens, not both")
    if a.prompt is None and a.prompt_tokens is None:
        a.prompt_tokens = DEFAULT_PROMPT_TOKENS
    if a.xclbin is not None and a.board != "u280":
        p.error(f"--xclbin is for --board u280, not --board {a.board}")
    if a.engines is not None and a.board == "u280":
        p.error("--engines is for --board golden and sim: the u280 kernel has the engines it was built with")
    if a.engines is not None and a.engines > MAX_ENGINES:
        p.error(f"--engines {a.engines}: at most {MAX_ENGINES} (one per HBM pseudo-channel)")
    check_output_path(p, "--json", a.json)
    return a


def build_prompt(tok, args) -> list:
    if args.prompt_tokens is not None:
        import pydoc_data.topics as topics
        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        ids = tok(text[: 8 * args.prompt_tokens + 1000]).input_ids[: args.prompt_tokens]
        if len(ids) < args.prompt_tokens:
            raise ValueError(f"could not build a {args.prompt_tokens}-token prompt")
        return ids
    text = args.prompt       # parse_args sets prompt_tokens when no --prompt is given
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(text).input_ids


def main(argv=None) -> int:
    args = parse_args(argv)
    from pmkvq_accel.host.device import open_device
    engines = {} if args.engines is None else {"engines": args.engines}
    device = open_device(args.board, xclbin=args.xclbin, **engines)  # fails fast, before torch and the model load
    try:
        import numpy as np
        import torch
        from transformers import AutoConfig

        import pmkvq_accel
        from pmkvq_accel.host import table as host_table
        from pmkvq_accel.host.accel import model_id_of, step_logprobs
        from pmkvq_accel.host.decode import float_agreement
        from pmkvq_accel.model.llm import load_model, resolve_model_dir
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        model_dir = resolve_model_dir(args.model)
        # the table is checked against the model's config before the weights load
        host_table.load_for_model(AutoConfig.from_pretrained(model_dir), args.table, model_id_of(model_dir))
        model, tok = load_model(args.model, device="cpu")
        prompt = build_prompt(tok, args)
        with pmkvq_accel.accelerate(model, tok, board=device, table=args.table,
                                    progress=not args.no_progress) as acc:
            print(f"model {model_id_of(model_dir)} | table {acc.table_label}"
                  f"{' | keys reparameterised' if acc.reparam_folded else ''} | board {device.name} | prompt "
                  f"{len(prompt)} tokens", flush=True)
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.max_new_tokens,
                                 eos_token_id=None if args.ignore_eos else tok.eos_token_id,
                                 output_logits=True, return_dict_in_generate=True)
            stats, new_ids = acc.stats, [int(t) for t in out.sequences[0, len(prompt):]]
            metrics = report(acc, stats)
            if not args.no_compare:
                logprobs = np.stack([step_logprobs(step[0]) for step in out.logits])
                agree = float_agreement(model, prompt, new_ids, logprobs)
                metrics["agreement"] = agree
                print(f"float-model agreement over {agree['positions']} tokens: top-1 match "
                      f"{100 * agree['top1_match']:.1f}%, mean KL {agree['mean_kl']:.4f} (max {agree['max_kl']:.3f})")
                alloc = getattr(acc.table, "allocation", {})
                print(f"method: {alloc.get('method', 'fallback')} widths {alloc.get('widths')}, KV rotation "
                      f"{getattr(acc.table, 'rotation', 'none')}, window {getattr(acc.table, 'window', '?')}: saved "
                      f"{(stats.fp16_bytes - stats.kv_bytes_with_metadata) / 2**20:.2f} MiB against float16 (cache "
                      f"{100 * stats.kv_bytes_with_metadata / stats.fp16_bytes:.1f}% of it, metadata included) for "
                      f"mean KL {agree['mean_kl']:.4f} and top-1 {100 * agree['top1_match']:.1f}% against the float "
                      f"model")
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=1) + "\n")
    finally:
        device.close()
    return 0


def report(acc, stats) -> dict:
    from pmkvq_accel.host.accel import width_runs
    print("\n--- generated text " + "-" * 50)
    print(acc.text.strip())
    print("-" * 69)
    print(stats.summary())
    final = [(lb.key_bits, lb.value_bits) for lb in acc.table.layers]
    print(f"the table's widths at max_len {acc.table.max_len}: {width_runs(final)}")
    return {**stats.as_dict(), "logprobs_sha256_16": stats.digest, "table": acc.table_label, "text": acc.text}


def run_main(main, argv=None) -> int:
    """Run a command's main(argv): the errors a user can cause print one line (PMKVQ_DEBUG=1: the traceback)
    and return status 2."""
    from pmkvq_accel.host.device import DeviceError, DeviceUnavailable
    from pmkvq_accel.model.cache import BudgetError
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    # NotImplementedError covers pmkvq_accel.Unsupported (what the accelerator cannot do)
    except (DeviceUnavailable, DeviceError, BudgetError, FileNotFoundError, ValueError, NotImplementedError) as e:
        if os.environ.get("PMKVQ_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def cli(argv=None) -> int:
    """`python host/run.py` / `pmkvq-run`."""
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
