// lora_delta_weight and lora_merge for every device (CompositeExplicitAutograd: ATen ops only, so CPU, CUDA
// and Meta share this one implementation). Merged weights are never differentiated.
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <lorafuse/ops/dora.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace lorafuse::composite {
namespace {

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble; }

// The delta of one adapter in `acc`, checked against [out, in] when out >= 0. `which` names the adapter in
// messages ("" for the single-adapter op, "[i]" for lists).
at::Tensor delta(const char* op, const at::Tensor& a, const at::Tensor& b, double scale, at::ScalarType acc,
                 int64_t out, int64_t in, const std::string& which) {
  const std::string A = "lora_a" + which, B = "lora_b" + which;
  TORCH_CHECK_VALUE(a.defined() && b.defined(), op, ": ", A, " and ", B, " must be tensors");
  TORCH_CHECK_VALUE(a.layout() == at::kStrided && b.layout() == at::kStrided, op, ": ", A, " and ", B,
                    " must be dense (strided) tensors; found layouts ", a.layout(), " and ", b.layout());
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", B, " must be on ", A, "'s device ", a.device(), "; found ",
                    b.device());
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, op, ": ", A, " must be 2-D [r, in] and ", B,
                    " 2-D [out, r]; found shapes ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(b.size(1) == a.size(0), op, ": ", B, " must have shape [out, r] with r = ", A,
                    ".size(0) = ", a.size(0), "; found ", b.sizes());
  TORCH_CHECK_VALUE(out < 0 || (b.size(0) == out && a.size(1) == in), op, ": adapter", which,
                    " must fit the weight [out, in] = [", out, ", ", in, "]; found ", A, " ", a.sizes(), " and ", B,
                    " ", b.sizes());
  TORCH_CHECK_TYPE(is_float(a.scalar_type()) && is_float(b.scalar_type()), op, ": ", A, " and ", B,
                   " must be floating tensors; found ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale", which, " must be finite; found ", scale);
  return at::mm(b.to(acc), a.to(acc)).mul_(scale);  // [out, in]
}

at::Tensor lora_delta_weight(const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  const auto acc = lora_a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return delta("lorafuse.lora_delta_weight", lora_a, lora_b, scale, acc, -1, -1, "");
}

at::Tensor lora_merge(const at::Tensor& weight, at::TensorList lora_a, at::TensorList lora_b,
                      c10::ArrayRef<double> scale,
                      const std::optional<c10::List<std::optional<at::Tensor>>>& magnitude) {
  constexpr const char* op = "lorafuse.lora_merge";
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2, op, ": weight must be a 2-D tensor [out, in]; found ",
                    weight.defined() ? weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(weight.layout() == at::kStrided, op, ": weight must be a dense (strided) tensor; found layout ",
                    weight.layout());
  TORCH_CHECK_TYPE(is_float(weight.scalar_type()), op, ": weight must be float32, float16, bfloat16 or float64; found ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(lora_a.size() == lora_b.size() && lora_a.size() == scale.size(), op,
                    ": lora_a, lora_b and scale must have one entry per adapter; found ", lora_a.size(), ", ",
                    lora_b.size(), " and ", scale.size());
  TORCH_CHECK_VALUE(!magnitude.has_value() || magnitude->size() == lora_a.size(), op,
                    ": magnitude must have one entry per adapter (None for plain LoRA); found ",
                    magnitude.has_value() ? magnitude->size() : 0, " for ", lora_a.size(), " adapters");
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor merged = weight.to(acc, /*non_blocking=*/false, /*copy=*/true);
  for (size_t i = 0; i < lora_a.size(); ++i) {
    TORCH_CHECK_VALUE(lora_a[i].device() == weight.device() && lora_b[i].device() == weight.device(), op, ": adapter ",
                      i, " must be on weight's device ", weight.device(), "; found ", lora_a[i].device(), " and ",
                      lora_b[i].device());
    const std::string which = "[" + std::to_string(i) + "]";
    merged.add_(delta(op, lora_a[i], lora_b[i], scale[i], acc, weight.size(0), weight.size(1), which));
    const std::optional<at::Tensor> m = magnitude.has_value() ? magnitude->get(i) : std::nullopt;
    if (m.has_value() && m->defined()) {  // DoRA: the rows rescaled to the magnitude over the unmerged weight's norm
      TORCH_CHECK_VALUE(m->dim() == 1 && m->size(0) == weight.size(0), op, ": magnitude", which, " must be [out] = [",
                        weight.size(0), "]; found ", m->sizes());
      TORCH_CHECK_TYPE(is_float(m->scalar_type()), op, ": magnitude", which, " must be a floating tensor; found ",
                       m->scalar_type());
      TORCH_CHECK_VALUE(m->device() == weight.device(), op, ": magnitude", which, " must be on weight's device ",
                        weight.device(), "; found ", m->device());
      const at::Tensor norm = lorafuse::dora_weight_norm(weight, lora_a[i], lora_b[i], scale[i]).to(acc);
      merged.mul_((m->detach().to(acc) / norm).unsqueeze(1));
    }
  }
  merged = merged.to(weight.scalar_type());  // checked after rounding: float16 overflows at 65504
  if (!merged.is_meta()) {
    TORCH_CHECK_VALUE(at::isfinite(merged).all().item<bool>(), op, ": merging gives non-finite ", weight.scalar_type(),
                      " weights; the base weight is left unchanged");
  }
  return merged;
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeExplicitAutograd, m) {
  m.impl("lora_delta_weight", &lorafuse::composite::lora_delta_weight);
  m.impl("lora_merge", &lorafuse::composite::lora_merge);
}
