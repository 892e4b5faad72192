import os

import pytest
import torch

# Triton has no CPU target: without a GPU its kernels run under the interpreter, which must be
# switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts as NaN, so an element a kernel does not write fails the test."""
    from vtok_kernels import backends

    backends.POISON_OUTPUTS = True
    yield
    backends.POISON_OUTPUTS = False
