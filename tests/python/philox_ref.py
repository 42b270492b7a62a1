"""An independent numpy model of lorafuse's dropout mask, used by the tests as the reference.

Philox-4x32-10 (Salmon et al., SC'11), written here from the algorithm's description, and the mask rule
documented in csrc/ops/common/dropout_philox.h: element ``e`` of x viewed as ``[T, in]`` (row-major
logical index ``e = t * in + k``) uses word ``e % 4`` of ``philox(counter=(offset // 4, e // 4), key=seed)``,
where ``offset // 4`` fills the low two 32-bit counter words and the 64-bit group index ``e // 4`` the high
two (low word first in each pair), and the 64-bit seed fills the two key words (low word first). The element is kept iff its word >= threshold,
threshold = floor(p * 2**32) (clamped to 2**32 - 1).
"""

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # round multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # key increments


def philox4x32_10(ctr, key):
    """ctr: four arrays (or ints) of 32-bit counter words; key: two 32-bit key words.

    Returns the four output words as uint64 arrays holding 32-bit values.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in ctr)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & _MASK32 for k in key)
    for _ in range(10):
        p0 = _M0 * c0  # < 2**64: a product of two 32-bit numbers
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    t = p * 4294967296.0
    return 0xFFFFFFFF if t >= 4294967295.0 else int(t)


def keep_mask(seed: int, offset: int, numel: int, p: float) -> np.ndarray:
    """Boolean keep mask of the first ``numel`` elements (flat logical index) for (seed, offset, p)."""
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    e = np.arange(numel, dtype=np.uint64)
    groups = np.arange((numel + 3) // 4, dtype=np.uint64)
    step = offset >> 2
    words = philox4x32_10(
        (step & 0xFFFFFFFF, step >> 32, groups & _MASK32, groups >> np.uint64(32)),
        (seed & 0xFFFFFFFF, seed >> 32),
    )
    words = np.stack(words, axis=1).reshape(-1)[:numel]  # word e % 4 of group e // 4
    assert words.shape[0] == e.shape[0]
    return words >= np.uint64(keep_threshold(p))
