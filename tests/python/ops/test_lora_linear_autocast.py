"""lora_linear under torch.autocast: x, weight and bias run in the autocast dtype, float32 adapters stay
float32, and gradients reach the original tensors in their own dtypes."""

import pytest
import torch
import torch.nn.functional as F

import lorafuse

SCALE = 1.5


def _inputs(device, tokens=33, in_f=48, out_f=40, r=8, weight_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g).to(device).requires_grad_()
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(device, weight_dtype)
    b = torch.randn(out_f, generator=g).to(device, weight_dtype)
    a = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(device).requires_grad_()
    bb = torch.randn(out_f, r, generator=g).to(device).requires_grad_()  # non-zero B
    return x, w, b, a, bb


def _chain(x, w, b, a, bb):
    """The unfused chain PEFT runs: what PyTorch itself gives under the same autocast."""
    return F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * SCALE


def _grads(y, leaves, grad_out):
    return torch.autograd.grad(y, leaves, grad_out)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_reference(device, amp_dtype):
    if device == "cpu" and amp_dtype == torch.float16:
        pytest.skip("CPU autocast in this suite: bfloat16")
    x, w, b, a, bb = _inputs(device)
    leaves = (x, a, bb)
    with torch.autocast(device, dtype=amp_dtype):
        ours = lorafuse.lora_linear(x, w, b, a, bb, SCALE)
        torch_chain = _chain(x, w, b, a, bb)
    assert ours.dtype == amp_dtype
    grad_out = torch.randn(ours.shape, generator=torch.Generator().manual_seed(5)).to(device)
    ours_g = _grads(ours.float(), leaves, grad_out)
    chain_g = _grads(torch_chain.float(), leaves, grad_out)
    assert [g.dtype for g in ours_g] == [torch.float32] * 3  # gradients come back in the leaves' dtype

    # float64 reference of what autocast means here: x, weight, bias rounded to the autocast dtype
    r64 = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    xr = r64[0].to(amp_dtype).double()
    ref = F.linear(xr, w.to(amp_dtype).double(), b.to(amp_dtype).double()) + SCALE * (xr @ r64[1].t()) @ r64[2].t()
    ref_g = _grads(ref, r64, grad_out.double())
    for name, got, base, want in [("out", ours, torch_chain, ref)] + [
        (n, o, c, rg) for n, o, c, rg in zip(("grad x", "grad lora_a", "grad lora_b"), ours_g, chain_g, ref_g)
    ]:
        err = (got.double() - want).abs().max().item()
        base_err = (base.double() - want).abs().max().item()
        atol = 1e-3 * max(1.0, want.abs().max().item())
        assert err <= 2 * base_err + atol, f"{name}: lorafuse {err:.3e} vs torch under autocast {base_err:.3e}"


def test_autocast_lets_a_low_precision_frozen_base_take_float32_activations(device):
    # the usual LoRA setup: frozen base in bf16, activations and adapters in fp32
    x, w, b, a, bb = _inputs(device, weight_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        lorafuse.lora_linear(x, w, b, a, bb, SCALE)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = lorafuse.lora_linear(x, w, b, a, bb, SCALE)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and a.grad is not None and bb.grad is not None
    assert a.grad.dtype == torch.float32 and bb.grad.abs().sum() > 0


def test_autocast_disabled_region_runs_in_the_inputs_dtype(device):
    x, w, b, a, bb = _inputs(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with torch.autocast(device, enabled=False):
            y = lorafuse.lora_linear(x, w, b, a, bb, SCALE)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _chain(x, w, b, a, bb), rtol=1e-5, atol=1e-5)
