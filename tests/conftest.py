import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_model():
    """The real embedded Gemma 3 270M, loaded once per test session (fp32 reference path)."""
    import gemmakit

    return gemmakit.load(dtype="float32", device="cpu", quant=None, progress=False)


@pytest.fixture(scope="session")
def fast_model():
    """The embedded model on the fast path (quant="auto": Q8_0 weight-only layers, native kernels)."""
    import gemmakit

    return gemmakit.load(progress=False)
