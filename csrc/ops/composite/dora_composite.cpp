// The DoRA ops (<lorafuse/ops/dora.h>). dora_weight_norm is device-generic (CompositeExplicitAutograd: ATen ops only,
// never differentiated); dora_linear decomposes into lora_linear / lora_branch and elementwise ops
// (CompositeImplicitAutograd), so autograd, the Meta device and torch.compile follow those ops.
#include <ATen/TensorOperators.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/dropout.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <lorafuse/ops/dora.h>
#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/lora_linear.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace lorafuse::composite {
namespace {

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble; }

void check_weight_and_adapter(const char* op, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                              double scale) {
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2, op, ": weight must be a 2-D tensor [out, in]; found ",
                    weight.defined() ? weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(a.defined() && b.defined() && a.dim() == 2 && b.dim() == 2, op,
                    ": lora_a must be 2-D [r, in] and lora_b 2-D [out, r]; found ",
                    a.defined() ? a.sizes() : at::IntArrayRef{}, " and ", b.defined() ? b.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(a.size(1) == weight.size(1) && b.size(0) == weight.size(0) && b.size(1) == a.size(0), op,
                    ": the adapter must fit weight [out, in] = ", weight.sizes(),
                    " as lora_a [r, in] and lora_b [out, r]; found ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_TYPE(is_float(weight.scalar_type()) && is_float(a.scalar_type()) && is_float(b.scalar_type()), op,
                   ": weight, lora_a and lora_b must be floating tensors; found ", weight.scalar_type(), ", ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == weight.device() && b.device() == weight.device(), op,
                    ": lora_a and lora_b must be on weight's device ", weight.device(), "; found ", a.device(), " and ",
                    b.device());
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite; found ", scale);
}

at::Tensor dora_weight_norm(const at::Tensor& weight_in, const at::Tensor& a_in, const at::Tensor& b_in, double scale) {
  check_weight_and_adapter("lorafuse.dora_weight_norm", weight_in, a_in, b_in, scale);
  const bool wide =
      weight_in.scalar_type() == at::kDouble || a_in.scalar_type() == at::kDouble || b_in.scalar_type() == at::kDouble;
  const auto acc = wide ? at::kDouble : at::kFloat;
  const at::Tensor w = weight_in.detach(), a = a_in.detach().to(acc), b = b_in.detach().to(acc);
  const int64_t out = w.size(0), in = w.size(1), r = a.size(0);
  // ‖Wᵢ‖² and W·Aᵀ [out, r]; a weight of another dtype is widened a block of rows at a time (≤ 4 Mi elements), never
  // as a whole
  at::Tensor sq, wa;
  if (w.scalar_type() == acc) {
    sq = at::linalg_vector_norm(w, 2, {1}).square_();
    wa = at::mm(w, a.t());
  } else {
    sq = at::empty({out}, w.options().dtype(acc));
    wa = at::empty({out, r}, w.options().dtype(acc));
    const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(in, 1));
    for (int64_t s = 0; s < out; s += rows) {
      const int64_t n = std::min(rows, out - s);
      const at::Tensor block = w.narrow(0, s, n).to(acc);
      sq.narrow(0, s, n).copy_(at::linalg_vector_norm(block, 2, {1}).square_());
      wa.narrow(0, s, n).copy_(at::mm(block, a.t()));
    }
  }
  const at::Tensor gram = at::mm(a, a.t());                                            // [r, r]
  const at::Tensor cross = wa.mul_(b).sum(1);                                          // ⟨(W·Aᵀ)ᵢ, Bᵢ⟩
  const at::Tensor lora = at::mm(b, gram).mul_(b).sum(1);                              // ‖(B·A)ᵢ‖²
  return sq.add_(cross, 2.0 * scale).add_(lora, scale * scale).clamp_min_(0).sqrt_();  // [out]
}

at::Tensor dora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
                       const at::Tensor& magnitude, const std::optional<at::Tensor>& base_out) {
  constexpr const char* op = "lorafuse.dora_linear";
  check_weight_and_adapter(op, weight, lora_a, lora_b, scale);
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK_VALUE(x.defined() && x.dim() >= 1 && x.size(-1) == in, op, ": x must be [..., in] with in = ", in,
                    " (weight [out, in] = ", weight.sizes(), "); found ", x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(magnitude.defined() && magnitude.dim() == 1 && magnitude.size(0) == out, op,
                    ": magnitude must be 1-D [out] = [", out, "]; found ",
                    magnitude.defined() ? magnitude.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(is_float(magnitude.scalar_type()), op, ": magnitude must be a floating tensor; found ",
                   magnitude.scalar_type());
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1); found ", dropout_p);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, op, ": bias must be [out] = [", out, "]; found ",
                      bias->sizes());
  }
  const bool given = base_out.has_value() && base_out->defined();
  if (given) {
    TORCH_CHECK_VALUE(base_out->dim() == x.dim() && base_out->size(-1) == out, op,
                      ": base_out must be the base layer's output [..., out] for x ", x.sizes(), "; found ",
                      base_out->sizes());
  }
  for (const auto* t : {&magnitude, has_bias ? &*bias : nullptr, given ? &*base_out : nullptr}) {
    TORCH_CHECK_VALUE(t == nullptr || t->device() == weight.device(), op,
                      ": magnitude, bias and base_out must be on weight's device ", weight.device(), "; found ",
                      t == nullptr ? weight.device() : t->device());
  }
  // g = m / ‖W + scale·B·A‖, the norm a constant (DoRA §4.3; PEFT detaches it)
  const at::Tensor g = magnitude / lorafuse::dora_weight_norm(weight.detach(), lora_a.detach(), lora_b.detach(), scale);
  // The DoRA arithmetic runs in the wider of x's and the adapter's dtypes (float32 adapters over a 16-bit base: x cast
  // to float32 for the branch, as PEFT does), so that the gradients reaching A, B and m are not rounded to 16 bits.
  const auto wide = at::promote_types(x.scalar_type(), lora_a.scalar_type());
  if (dropout_p == 0.0) {
    at::Tensor adapted;  // x·Wᵀ + scale·(x·Aᵀ)·Bᵀ, without the bias
    if (!given && wide == x.scalar_type()) {
      adapted = lorafuse::lora_linear(x, weight, std::nullopt, lora_a, lora_b, scale, 0.0);  // one fused pass
    } else {
      const at::Tensor base = given ? (has_bias ? *base_out - *bias : *base_out) : at::linear(x, weight);
      adapted = lorafuse::lora_branch(base.to(wide), x.to(wide), lora_a, lora_b, scale, 0.0);
    }
    const at::Tensor gs = g.to(adapted.scalar_type());
    const at::Tensor y = has_bias ? at::addcmul(bias->to(adapted.scalar_type()), adapted, gs) : adapted * gs;
    return y.to(x.scalar_type());
  }
  // PEFT with dropout: base(x) + (g − 1) ⊙ x̃·Wᵀ + g ⊙ scale·(x̃·Aᵀ)·Bᵀ; the branch on x̃ needs its own base GEMM
  const at::Tensor dropped = at::dropout(x, dropout_p, /*train=*/true);
  const at::Tensor base = given ? *base_out : at::linear(x, weight, has_bias ? *bias : at::Tensor());
  const at::Tensor plain = at::linear(dropped, weight).to(wide);  // x̃·Wᵀ [..., out]
  // g ⊙ (x̃·Wᵀ + scale·(x̃·Aᵀ)·Bᵀ) − x̃·Wᵀ + base(x)
  const at::Tensor branch = lorafuse::lora_branch(plain, dropped.to(wide), lora_a, lora_b, scale, 0.0) * g.to(wide);
  return (base.to(wide) + (branch - plain)).to(x.scalar_type());
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeExplicitAutograd, m) {
  m.impl("dora_weight_norm", &lorafuse::composite::dora_weight_norm);
}

// A constant for autograd (DoRA detaches the norm): no graph node, whatever requires grad.
TORCH_LIBRARY_IMPL(lorafuse, Autograd, m) { m.impl("dora_weight_norm", torch::CppFunction::makeFallthrough()); }

TORCH_LIBRARY_IMPL(lorafuse, CompositeImplicitAutograd, m) { m.impl("dora_linear", &lorafuse::composite::dora_linear); }
