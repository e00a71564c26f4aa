"""Console-script entry points (pyproject.toml [project.scripts]) for jobs whose main() does not return an
exit status. `pmkvq-run`, `pmkvq-bench` and `pmkvq-bitstream` call their modules' own entry points."""
from __future__ import annotations


def calib() -> int:
    """pmkvq-calib = python calib/calibrate.py (the PM-KVQ calibration of a model: its bit-width table)."""
    from pmkvq_accel.calib import calibrate
    calibrate.main()
    return 0


def evaluate() -> int:
    """pmkvq-eval = python calib/evaluate.py (methods side by side at matched memory)."""
    from pmkvq_accel.calib import evaluate as ev
    ev.main()
    return 0
