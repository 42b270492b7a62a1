// CPU kernel of lora_add: the shrink u = drop(x)·Aᵀ through the CPU BLAS, then the expand accumulated onto a
// copy of the base output in place (beta = 1). Backward: lora_linear_backward_cpu without weight.
#include <ATen/ops/clone.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "csrc/ops/common/lora_linear_checks.h"
#include "csrc/ops/cpu/dropout_cpu.h"
#include "csrc/ops/cpu/lora_linear_cpu.h"

namespace lorafuse::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_add_forward_cpu(const at::Tensor& base_out, const at::Tensor& x,
                                                                    const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                    double scale, double dropout_p) {
  detail::check_lora_add_args("lorafuse.lora_add", base_out, x, lora_a, lora_b, scale, dropout_p);
  const int64_t in = x.size(-1), out = base_out.size(-1);
  const int64_t tokens = detail::leading_numel(x.sizes());
  const at::ScalarType acc = detail::lora_acc_dtype(x, lora_a);
  uint64_t seed = 0;
  at::Tensor rng_state = forward_rng_state(x, dropout_p, seed);
  const at::Tensor x2 = x.reshape({tokens, in});                                        // [T, in]
  at::Tensor u = lora_shrink(x2, lora_a.to(acc), seed, /*offset=*/0, dropout_p);        // [T, r]
  at::Tensor y2 = base_out.reshape({tokens, out}).clone(at::MemoryFormat::Contiguous);  // [T, out]
  add_expand_(y2, u, lora_b, scale);
  return {y2.view(base_out.sizes()), u, rng_state};
}

void add_expand_(at::Tensor& y2, const at::Tensor& u, const at::Tensor& lora_b, double scale) {
  const at::ScalarType acc = u.scalar_type();
  if (y2.scalar_type() == acc) {
    y2.addmm_(u, lora_b.to(acc).t(), /*beta=*/1, /*alpha=*/scale);
  } else {  // a half-precision output: expand in float32, add once
    y2.add_(at::mm(u, lora_b.to(acc).t()).mul_(scale).to(y2.scalar_type()));
  }
}

at::Tensor lora_add_cpu(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                        const at::Tensor& lora_b, double scale, double dropout_p) {
  return std::get<0>(lora_add_forward_cpu(base_out, x, lora_a, lora_b, scale, dropout_p));
}

}  // namespace lorafuse::cpu

TORCH_LIBRARY_IMPL(lorafuse, CPU, m) {
  m.impl("lora_add", &lorafuse::cpu::lora_add_cpu);
  m.impl("lora_add_forward", &lorafuse::cpu::lora_add_forward_cpu);
}
