import pytest

from pmkvq_accel.sim import runner


@pytest.fixture(scope="session")
def sim_runner():
    return runner
