"""sim/runner.rtl_source_key: one content key for every RTL build cache. A change to any hw/ or model/
source (a model/formats.py constant, model.attention.EXP2_TABLE, ...), to the parameters or to the
build arguments gives a new key, so no cache can hand back a simulator built from stale sources."""
import shutil

import pytest

from pmkvq_accel.sim import runner


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A private copy of hw/ and model/ that the key reads (the shared tree is never touched)."""
    for d in ("hw", "model"):
        shutil.copytree(runner.ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    monkeypatch.setattr(runner, "RTL_SOURCE_DIRS", (tmp_path / "hw", tmp_path / "model"))
    return tmp_path


def test_key_is_the_same_for_the_same_sources(tree):
    assert runner.rtl_source_key({"a": 1, "b": 2}) == runner.rtl_source_key({"b": 2, "a": 1})


def test_model_constant_changes_the_key(tree):
    before = runner.rtl_source_key({"lanes": 4})
    f = tree / "model" / "formats.py"
    text = f.read_text()
    assert "TERM_LIMIT_BITS = 62" in text
    f.write_text(text.replace("TERM_LIMIT_BITS = 62", "TERM_LIMIT_BITS = 61"))
    assert runner.rtl_source_key({"lanes": 4}) != before


def test_exp2_table_source_and_new_files_change_the_key(tree):
    before = runner.rtl_source_key({})
    f = tree / "model" / "attention.py"
    f.write_text(f.read_text() + "\n# touched\n")
    mid = runner.rtl_source_key({})
    assert mid != before
    (tree / "hw" / "new_block.py").write_text("X = 1\n")
    assert runner.rtl_source_key({}) != mid


def test_params_and_build_args_change_the_key(tree):
    k = runner.rtl_source_key({"lanes": 4})
    assert runner.rtl_source_key({"lanes": 8}) != k
    assert runner.rtl_source_key({"lanes": 4}, build_args=runner.BUILD_ARGS + ["-O2"]) != k
    assert runner.rtl_source_key({"lanes": 4}, build_args=runner.BUILD_ARGS) == k


def test_every_rtl_source_is_hashed():
    files = {p.relative_to(runner.ROOT).as_posix() for p in runner.rtl_source_files()}
    for must in ("model/formats.py", "model/attention.py", "hw/attention.py", "hw/config.py"):
        assert must in files


def test_non_rtl_hw_modules_do_not_change_the_key(tree):
    before = runner.rtl_source_key({})
    (tree / "hw" / "vitis.py").write_text((tree / "hw" / "vitis.py").read_text() + "\n# a comment\n")
    assert runner.rtl_source_key({}) == before
    (tree / "hw" / "kernel.py").write_text((tree / "hw" / "kernel.py").read_text() + "\n# a comment\n")
    assert runner.rtl_source_key({}) != before


def test_elaborating_the_kernel_imports_no_excluded_module():
    """What NOT_RTL leaves out of the key is really not read when the RTL is built."""
    import subprocess
    import sys
    code = ("import sys\n"
            "from amaranth.hdl import Fragment\n"
            "from pmkvq_accel.hw.kernel import Kernel, KernelConfig\n"
            "Fragment.get(Kernel(KernelConfig(engines=2, word_bits=128, max_tokens=256)), None)\n"
            f"print(sorted(m for m in sys.modules if m.rsplit('.', 1)[-1] + '.py' in {runner.NOT_RTL!r} "
            "and m.startswith('pmkvq_accel.hw.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
