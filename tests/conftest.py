import pytest


@pytest.fixture(scope="module")
def model():
    """The default model on one torch thread (with several, a busy shared machine slows them 10x)."""
    import torch
    from pmkvq_accel.model.llm import load_model
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(device="cpu")
    torch.set_num_threads(n)
