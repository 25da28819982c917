from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real datasets beside the checkout (../shared/data); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test works on tiny tensors, where syncing a second thread costs more than it saves,
    and OpenMP threads spin-wait when the 2 CI cores are shared with other processes (that made
    one quantizer test 40x and a tiny training loop ~15x slower). Tests that care about threads
    set them themselves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
