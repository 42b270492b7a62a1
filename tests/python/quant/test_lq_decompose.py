"""LQ-LoRA's decomposition of one matrix (lorafuse.lq_decompose, the C++ lorafuse::lq_decompose): against a float64
reference of the same method with an exact SVD, the best iterate kept, exact on a W that is exactly Q + L1·L2, the
Fisher weighting, and bad input."""

import pytest
import torch

import lorafuse
from lorafuse import NfFormat


def spectrum_matrix(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """A weight with a decaying spectrum plus noise, like a trained layer's."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))[0]
    v = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))[0]
    k = min(out_f, in_f)
    s = 3.0 / (1 + torch.arange(k, dtype=torch.float32)) ** 0.7
    return (u[:, :k] * s) @ v[:, :k].T + 0.02 * torch.randn(out_f, in_f, generator=g)


def reference(w: torch.Tensor, rank: int, f: NfFormat, iters: int, tol: float, fisher=None):
    """The method in float64 with an exact SVD (the quantizer is the op itself): errors per iteration, best kept."""
    w64 = w.double()
    if fisher is not None:
        dr = fisher.double().mean(1, keepdim=True).sqrt()
        dc = fisher.double().mean(0, keepdim=True).sqrt()
    q = torch.zeros_like(w64)
    best, errors = float("inf"), []
    for it in range(iters):
        r = w64 - q
        if fisher is not None:
            r = dr * r * dc
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        l1, l2 = u[:, :rank] * s[:rank].sqrt(), s[:rank].sqrt()[:, None] * vh[:rank]
        if fisher is not None:
            l1, l2 = l1 / dr, l2 / dc
        low = l1 @ l2
        q = lorafuse.dequantize_nf(lorafuse.quantize_nf((w64 - low).float(), f), f, w.shape).double()
        e = w64 - q - low
        error = (e * fisher.double().sqrt() if fisher is not None else e).norm().item()
        errors.append(error)
        previous, best = best, min(best, error)
        if it > 0 and not previous - error > tol * previous:
            break
    return best, errors


@pytest.mark.parametrize("f", [NfFormat(3, 64, 8, 256), NfFormat(2, 32, 4, 64), NfFormat(4, 64, 8, 256)], ids=str)
def test_matches_the_float64_reference_and_keeps_the_best_iterate(f):
    w = spectrum_matrix(96, 160, seed=0)
    d = lorafuse.lq_decompose(w, 8, f, max_iters=15, tol=1e-3)
    ref_best, ref_errors = reference(w, 8, f, 15, 1e-3)
    # the randomized SVD (sketch of r + 10 columns, two power iterations) against the exact one
    assert d.error == pytest.approx(ref_best, rel=0.02)
    assert d.error == min(d.errors) and d.errors[d.best_iteration - 1] == d.error
    assert 1 <= len(d.errors) <= 15 and d.errors[0] == pytest.approx(ref_errors[0], rel=0.02)
    # the returned factors and Q give the reported error
    q = lorafuse.dequantize_nf(d.q, f, w.shape).double()
    assert (w.double() - q - d.l1.double() @ d.l2.double()).norm().item() == pytest.approx(d.error, rel=1e-5)
    assert d.norm == pytest.approx(w.norm().item(), rel=1e-6)
    # better than quantizing W alone, and than the first iterate
    plain = (lorafuse.dequantize_nf(lorafuse.quantize_nf(w, f), f, w.shape) - w).norm().item()
    assert d.error < d.errors[0] and d.error < 0.9 * plain


def test_a_higher_rank_leaves_less_error():
    w = spectrum_matrix(80, 120, seed=1)
    f = NfFormat(3, 64, 8, 256)
    errors = [lorafuse.lq_decompose(w, r, f).relative_error for r in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2], errors


def test_exact_when_w_is_exactly_q_plus_a_low_rank_product():
    """Q0 (exactly representable) lives in rows 0..31 and columns 0..47, the rank-6 product in the other rows and
    columns, with larger singular values: the first SVD finds the product, the quantization then gives Q0 back."""
    g = torch.Generator().manual_seed(2)
    f = NfFormat(4, 64, 0, 0)  # float32 statistics: a dequantized weight quantizes back to itself
    corner = torch.zeros(64, 96)
    corner[:32, :48] = 0.05 * torch.randn(32, 48, generator=g)
    q0 = lorafuse.quantize_nf(corner, f)
    low = torch.zeros(64, 96)
    low[32:, 48:] = torch.randn(32, 6, generator=g) @ torch.randn(6, 48, generator=g)
    w = lorafuse.dequantize_nf(q0, f, (64, 96)) + low
    d = lorafuse.lq_decompose(w, 6, f, max_iters=10)
    assert d.relative_error < 1e-6, d.errors
    # Q is Q0 up to the float32 rounding of the SVD (blocks of Q0's zeros quantize that rounding, ~1e-6)
    q = lorafuse.dequantize_nf(d.q, f, (64, 96))
    assert (q - lorafuse.dequantize_nf(q0, f, (64, 96))).abs().max() < 1e-5


def test_seeded_and_deterministic():
    w = spectrum_matrix(48, 64, seed=3)
    f = NfFormat(3, 32, 4, 16)
    a, b = lorafuse.lq_decompose(w, 4, f, seed=7), lorafuse.lq_decompose(w, 4, f, seed=7)
    assert torch.equal(a.l1, b.l1) and torch.equal(a.l2, b.l2) and a.errors == b.errors
    assert all(torch.equal(x, y) for x, y in zip(a.q, b.q))


def test_fisher_weighting():
    w = spectrum_matrix(64, 96, seed=4)
    f = NfFormat(3, 64, 8, 256)
    ones = torch.ones_like(w)
    plain, uniform = lorafuse.lq_decompose(w, 4, f), lorafuse.lq_decompose(w, 4, f, fisher=ones)
    assert torch.equal(plain.l1, uniform.l1) and plain.errors == uniform.errors  # F = 1 changes nothing
    g = torch.Generator().manual_seed(5)
    # a few rows and columns matter much more than the rest
    fisher = torch.rand(64, 1, generator=g) ** 4 * 100 * torch.rand(1, 96, generator=g) ** 4
    weighted = lorafuse.lq_decompose(w, 4, f, fisher=fisher, max_iters=10)
    ref_best, _ = reference(w, 4, f, 10, 1e-3, fisher=fisher)
    assert weighted.error == pytest.approx(ref_best, rel=0.03)
    q = lorafuse.dequantize_nf(plain.q, f, w.shape)
    plain_weighted_error = ((w - q - plain.l1 @ plain.l2) * fisher.sqrt()).norm().item()
    assert weighted.error < plain_weighted_error  # what the Fisher cares about is kept better
    assert weighted.norm == pytest.approx((w * fisher.sqrt()).norm().item(), rel=1e-5)


def test_bad_input_is_named():
    w = torch.randn(16, 24)
    f = NfFormat(3, 64, 8, 256)
    cases = [
        (dict(weight=torch.randn(16)), r"weight: expected a 2-D tensor \[out, in\], found \[16\]"),
        (dict(weight=w.double()), "weight: expected float32, bfloat16 or float16, found Double"),
        (dict(weight=torch.where(w > 1, float("inf"), w)), "weight: expected finite values"),
        (dict(rank=16), r"rank: expected 1 <= rank < min\(out, in\) = 16 for weight \[16, 24\], found 16"),
        (dict(rank=0), "rank: expected 1 <= rank"),
        (dict(format=NfFormat(1, 64, 8, 256)), "format: bits: expected 2 .. 8, found 1"),
        (dict(max_iters=0), "max_iters: expected >= 1, found 0"),
        (dict(tol=-1.0), "tol: expected a finite value >= 0, found -1"),
        (dict(fisher=torch.ones(24, 16)), r"fisher: expected the weight's shape \[16, 24\], found \[24, 16\]"),
        (dict(fisher=-torch.ones(16, 24)), "fisher: expected finite values >= 0"),
    ]
    for change, message in cases:
        args = dict(weight=w, rank=4, format=f) | change
        with pytest.raises(ValueError, match="lq_decompose: " + message):
            lorafuse.lq_decompose(args.pop("weight"), args.pop("rank"), args.pop("format"), **args)
