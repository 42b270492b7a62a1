"""lorafuse: fused LoRA linear layers for PyTorch, with CPU and CUDA kernels.

Importing this package registers the ``torch.ops.lorafuse.*`` operators.
"""

import torch  # noqa: F401  (loads libtorch before lorafuse's native library)

from . import _C
from .ops import lora_linear

__version__: str = _C.__version__


def has_cuda_kernels() -> bool:
    """Whether this build of lorafuse has its CUDA kernels (``LORAFUSE_CUDA`` at build time)."""
    return bool(_C.has_cuda_kernels())


__all__ = ["lora_linear", "has_cuda_kernels", "__version__"]
