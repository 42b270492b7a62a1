"""Shared fixtures of the lorafuse Python tests.

Nothing here touches CUDA at import or collection time: the ``device`` fixture decides whether a CUDA
case runs only when the case itself starts.
"""

import os
import sys

import pytest
import torch

# The shared helpers (hf_models, adapter_files, philox_ref, distributed_worker) live beside this file; the
# tests live in folders that mirror the source tree.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import lorafuse
except ImportError:  # running from a checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
    import lorafuse


def cuda_skip_reason():
    """Why CUDA cases cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not lorafuse.has_cuda_kernels():
        return "this build of lorafuse has no CUDA kernels (LORAFUSE_CUDA=0)"
    return None


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Every device the op has kernels for; CUDA cases skip cleanly without a GPU or CUDA kernels."""
    if request.param == "cuda":
        reason = cuda_skip_reason()
        if reason is not None:
            pytest.skip(reason)
    return request.param
