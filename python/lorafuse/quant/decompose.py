"""LQ-LoRA's decomposition of one weight matrix, W ≈ Q + L1·L2 (lorafuse::lq_decompose in C++)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from .. import _C
from ..ops import NfFormat, NfWeight


@dataclass(frozen=True)
class LqDecomposition:
    """The best iterate of :func:`lq_decompose`."""

    l1: Tensor  #: [out, r] float32
    l2: Tensor  #: [r, in] float32
    q: NfWeight  #: Q in the requested format
    error: float  #: ‖W − (Q + L1·L2)‖_F (Fisher-weighted: ‖√F ⊙ (W − Q − L1·L2)‖_F)
    norm: float  #: ‖W‖_F (Fisher-weighted: ‖√F ⊙ W‖_F)
    errors: List[float]  #: the error after each iteration that ran
    best_iteration: int  #: 1-based iteration of the best (returned) iterate

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


def lq_decompose(
    weight: Tensor,
    rank: int,
    format: NfFormat = NfFormat(4, 64, 8, 256),
    *,
    stat_dtype: torch.dtype = torch.float32,
    max_iters: int = 20,
    tol: float = 1e-3,
    oversampling: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    fisher: Optional[Tensor] = None,
) -> LqDecomposition:
    """Decomposes ``weight`` [out, in] as Q + L1·L2: from Q = 0, alternately L1, L2 = the rank-``rank`` randomized
    SVD of W − Q (``oversampling`` extra sketch columns, ``power_iters`` power iterations, Gaussian sketch from
    ``seed``) and Q = quantize(W − L1·L2) in ``format``, until an iteration improves the best error by less than
    ``tol`` of it (or makes it worse) or ``max_iters`` ran. The best iterate is returned (the LQ-LoRA reference
    stops at the first increase and returns that worse one).

    ``fisher`` [out, in] (the diagonal empirical Fisher, sums of squared per-example gradients) weights the SVD by
    rows and columns, D_r·(W − Q)·D_c with D_r = sqrt(row means), D_c = sqrt(column means), and the error by √F;
    the quantization itself is not weighted.

    Raises:
        ValueError: a weight that is not 2-D or not finite, a rank outside [1, min(out, in)), a format or option out
            of range, a ``fisher`` of another shape or with negative or non-finite values (each names the argument).
    """
    l1, l2, q, error, norm, errors, best = _C._lq_decompose(
        weight, int(rank), list(format), stat_dtype, int(max_iters), float(tol), int(oversampling),
        int(power_iters), int(seed), fisher,
    )
    return LqDecomposition(l1, l2, NfWeight(*q), error, norm, list(errors), best)
