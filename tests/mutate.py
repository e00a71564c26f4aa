"""Mutation check of the golden model and the RTL: do the tests notice a one-token change at a rounding, shift,
saturation or exponent site? (docs/mutation.md)

    nice -n 10 .venv/bin/python tests/mutate.py                 # every mutant in tests/mutants.toml
    nice -n 10 .venv/bin/python tests/mutate.py --only E-zero    # ids containing a substring
    .venv/bin/python tests/mutate.py --list                      # the catalogue

Not part of the default test run (it takes minutes). The shared working tree is never modified: the repository
(git HEAD by default, `--worktree` for the files as they are now) is copied into a temporary directory, each
mutant is written into that copy, and the tests run there in a subprocess with the copy first on PYTHONPATH
(as the package `pmkvq_accel`), so an interrupted run leaves nothing behind but the temporary directory,
which is removed on exit (also on Ctrl-C).

The catalogue (tests/mutants.toml) is a list of [[mutant]] tables:
    id      unique name
    file    repository path of the file to mutate (model/... or hw/...)
    find    exact source text; it must occur exactly once in the file (or give `occurrence`, 1-based)
    replace the text put in its place
    suite   a key of [suites] (default "model"): the tests run against this mutant, in order, stopping at
            the first failure; or `tests`, an explicit list of pytest node ids
    site    what kind of site (rounding, shift, saturation, exponent, constant, table, ...), for the report
    equivalent  (optional) the argument why the mutant cannot be told apart; it is then expected to survive
A mutant is killed when the selected tests fail (or error: a mutant that does not import counts as killed,
reported as such); it survives when they pass. Exit status 1 when a mutant not marked equivalent survives.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "tests" / "mutants.toml"
PACKAGES = ("model", "hw", "host", "sim", "calib")       # importable as pmkvq_accel.<name>
COPIED = (*PACKAGES, "tests", "docs", "pyproject.toml")


def load(path: Path = CATALOGUE):
    cat = tomllib.loads(path.read_text())
    suites, mutants = cat["suites"], cat["mutant"]
    ids = [m["id"] for m in mutants]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise SystemExit(f"duplicate mutant ids: {sorted(dup)}")
    for m in mutants:
        if "tests" not in m and m.get("suite", "model") not in suites:
            raise SystemExit(f"{m['id']}: unknown suite {m.get('suite')!r}")
    return suites, mutants


def snapshot(dest: Path, worktree: bool) -> None:
    """The repository's sources (HEAD, or the working tree) under dest/repo, and dest/pkg/pmkvq_accel linking
    to them, so that `PYTHONPATH=dest/pkg` imports the copy instead of the editable install."""
    repo = dest / "repo"
    repo.mkdir(parents=True)
    if worktree:
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, repo / name)
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", *COPIED], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(repo)], input=archive, check=True)
    pkg = dest / "pkg" / "pmkvq_accel"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in PACKAGES:
        if (repo / name).is_dir():
            (pkg / name).symlink_to(repo / name, target_is_directory=True)


def apply(text: str, m: dict) -> str:
    """The file text with the mutant's `find` replaced (exactly one occurrence, or the one named)."""
    n = text.count(m["find"])
    occ = m.get("occurrence")
    if occ is None and n != 1:
        raise ValueError(f"{m['id']}: `find` occurs {n} times in {m['file']} (give `occurrence`)")
    if occ is not None and not 1 <= occ <= n:
        raise ValueError(f"{m['id']}: occurrence {occ} of {n}")
    at = -1
    for _ in range(occ or 1):
        at = text.index(m["find"], at + 1)
    return text[:at] + m["replace"] + text[at + len(m["find"]):]


def run_tests(dest: Path, tests, timeout: float):
    env = dict(os.environ, PYTHONPATH=str(dest / "pkg"), PYTHONDONTWRITEBYTECODE="1",
               PYTHONWARNINGS="ignore::DeprecationWarning")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rfE",
           *[str(t) for t in tests]]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=dest / "repo", env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    tail = (p.stdout + p.stderr).strip().splitlines()
    first = next((l for l in tail if l.startswith(("FAILED", "ERROR"))), tail[-1] if tail else "")
    return {0: "pass", 1: "fail"}.get(p.returncode, f"error({p.returncode})"), time.perf_counter() - t0, first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], help="run mutants whose id contains this (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the catalogue and exit")
    ap.add_argument("--worktree", action="store_true", help="copy the working tree instead of git HEAD")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--catalogue", type=Path, default=CATALOGUE)
    args = ap.parse_args(argv)
    suites, mutants = load(args.catalogue)
    if args.only:
        mutants = [m for m in mutants if any(s in m["id"] for s in args.only)]
    if args.list:
        for m in mutants:
            print(f"{m['id']:28} {m['file']:22} {m.get('site', ''):11} {m['find']!r} -> {m['replace']!r}")
        return 0
    with tempfile.TemporaryDirectory(prefix="pmkvq-mutate-") as tmp:
        dest = Path(tmp)
        snapshot(dest, args.worktree)
        selected = {}
        for m in mutants:
            selected[m["id"]] = m.get("tests") or suites[m.get("suite", "model")]
            apply((dest / "repo" / m["file"]).read_text(), m)   # every `find` is checked before anything runs
        for tests in {json.dumps(t) for t in selected.values()}:
            status, secs, first = run_tests(dest, json.loads(tests), args.timeout)
            print(f"baseline ({len(json.loads(tests))} test files): {status} in {secs:.0f} s", flush=True)
            if status != "pass":
                print(f"  the unmutated sources fail: {first}")
                return 2
        results = []
        for m in mutants:
            path = dest / "repo" / m["file"]
            original = path.read_text()
            try:
                path.write_text(apply(original, m))
                status, secs, first = run_tests(dest, selected[m["id"]], args.timeout)
            finally:
                path.write_text(original)
            verdict = "survived" if status == "pass" else "killed"
            if verdict == "survived" and m.get("equivalent"):
                verdict = "equivalent"
            results.append(dict(id=m["id"], file=m["file"], site=m.get("site", ""), verdict=verdict,
                                status=status, seconds=round(secs, 1), first_failure=first))
            print(f"{verdict:10} {m['id']:28} {secs:5.0f} s  {first[:90] if verdict == 'killed' else ''}",
                  flush=True)
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("killed", "survived", "equivalent")}
    print(f"{len(results)} mutants: {counts['killed']} killed, {counts['survived']} survived, "
          f"{counts['equivalent']} equivalent (argued in the catalogue)")
    for r in results:
        if r["verdict"] == "survived":
            print(f"  SURVIVED {r['id']} ({r['file']}, {r['site']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if counts["survived"] else 0


if __name__ == "__main__":
    sys.exit(main())
