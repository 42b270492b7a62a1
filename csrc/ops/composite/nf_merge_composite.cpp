// nf_merge: merging adapters into a quantized weight, asked for explicitly, with what the rounding cost reported
// (CompositeExplicitAutograd: it calls dequantize_nf, lora_merge and quantize_nf, so every device they run on).
#include <ATen/TensorOperators.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <lorafuse/ops/merge.h>
#include <lorafuse/ops/nf.h>

namespace lorafuse::composite {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf_merge_composite(
    const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& offset, at::IntArrayRef format, at::IntArrayRef shape, at::TensorList lora_a,
    at::TensorList lora_b, c10::ArrayRef<double> scale) {
  TORCH_CHECK_VALUE(shape.size() == 2, "lorafuse.nf_merge: shape must be [out, in]; found ", shape);
  TORCH_CHECK_VALUE(!lora_a.empty(), "lorafuse.nf_merge: lora_a: expected at least one adapter, found none");
  const bool nested = nested_absmax.has_value() && nested_absmax->defined() && nested_absmax->numel() > 0;
  const at::Tensor original = lorafuse::dequantize_nf(packed, absmax, nested_absmax, offset, format, shape,
                                                      at::kFloat);  // [out, in]; checks the format
  const at::Tensor merged =
      lorafuse::lora_merge(original, lora_a.vec(), lora_b.vec(), scale.vec());  // checks finiteness
  const NfWeight q = lorafuse::quantize_nf(merged, format, nested ? nested_absmax->scalar_type() : at::kFloat);
  const at::Tensor rounded =
      lorafuse::dequantize_nf(q.packed, q.absmax, q.nested_absmax, q.offset, format, shape, at::kFloat);
  const auto norm = [](const at::Tensor& t) { return t.to(at::kDouble).norm(); };
  const at::Tensor error = norm(rounded - merged);
  // no rounding error reads as 0 also over a zero denominator (a zero weight, zero adapters); rounding over zero
  // adapters (re-quantized statistics need not reproduce the old ones) reads as inf
  const auto ratio = [&](const at::Tensor& denominator) {
    return at::where(error == 0, at::zeros_like(error), error / denominator);
  };
  return {q.packed, q.absmax, q.nested_absmax, q.offset,
          at::stack({ratio(norm(merged)), ratio(norm(merged - original))}).to(at::kFloat)};
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeExplicitAutograd, m) {
  m.impl("nf_merge", &lorafuse::composite::nf_merge_composite);
}
