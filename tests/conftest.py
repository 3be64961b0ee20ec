import numpy as np
import pytest


@pytest.fixture(scope="session")
def minilm_weights():
    from tnlm.integration import load_default_weights

    try:
        return load_default_weights()
    except FileNotFoundError as err:
        pytest.skip(f"offline MiniLM not available: {err}")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
