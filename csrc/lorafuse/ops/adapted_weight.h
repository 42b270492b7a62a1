// lorafuse — the C++ API of lora_adapted_weight (csrc/ops/adapted_weight.cpp): a base weight with an adapter added, for
// layers whose base reads its weights instead of being called (nn.MultiheadAttention's packed and output projections).
#pragma once

#include <ATen/core/Tensor.h>

namespace lorafuse {

/// W + scale · B · A in W's dtype (the product in the adapter's dtype, then rounded to W's, as PEFT merges it).
///
/// weight [out, in]; lora_a [r, in]; lora_b [out, r]. Differentiable in all three (CompositeImplicitAutograd), so the
/// gradients of whatever computes with the result reach A and B.
at::Tensor lora_adapted_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               double scale);

}  // namespace lorafuse
