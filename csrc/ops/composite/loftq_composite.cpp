// loftq_init: LoftQ's initialisation of a LoRA layer, PEFT's loop (CompositeExplicitAutograd: it calls quantize_nf,
// dequantize_nf and linalg_svd, so it runs wherever they do; never differentiated).
#include <ATen/core/grad_mode.h>
#include <ATen/ops/linalg_svd.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sqrt.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <lorafuse/ops/nf.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace lorafuse::composite {
namespace {

constexpr const char* kOp = "lorafuse.loftq_init";
constexpr int64_t kLoftqBlocksize = 64;  // PEFT's: bitsandbytes' Params4bit default

std::tuple<at::Tensor, at::Tensor, at::Tensor> loftq_init_composite(const at::Tensor& weight, int64_t bits, int64_t r,
                                                                    int64_t num_iter) {
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2, kOp, ": weight: expected a 2-D [out, in] tensor, found ",
                    weight.defined() ? weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), kOp, ": weight: expected a floating-point dtype, found ",
                   weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK_VALUE(r >= 1 && r <= std::min(out, in), kOp, ": r: expected 1 .. min(out, in) = ", std::min(out, in),
                    " for a [", out, ", ", in, "] weight, found ", r);
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, kOp, ": bits: expected 2 .. 8 (NF code bits; PEFT's LoftQ: 4), found ",
                    bits);
  TORCH_CHECK_VALUE(num_iter >= 1, kOp, ": num_iter: expected >= 1, found ", num_iter);
  const at::NoGradGuard no_grad;
  const std::vector<int64_t> format = {bits, kLoftqBlocksize, 0, 0};
  const at::Tensor w = weight.detach().to(at::kFloat).contiguous();
  at::Tensor res = w;  // what is quantized: W − L·R (L·R = 0 at first)
  at::Tensor q, lora_a, lora_b;
  for (int64_t i = 0; i < num_iter; ++i) {
    const NfWeight packed = quantize_nf(res, format);  // checks that the values are finite
    q = dequantize_nf(packed.packed, packed.absmax, packed.nested_absmax, packed.offset, format, {out, in}, at::kFloat);
    auto [u, s, vh] = at::linalg_svd(w.sub(q), /*full_matrices=*/false);
    const at::Tensor root = at::sqrt(s.narrow(0, 0, r));
    lora_b = u.narrow(1, 0, r).mul(root.unsqueeze(0)).contiguous();   // L = U·√S [out, r]
    lora_a = vh.narrow(0, 0, r).mul(root.unsqueeze(1)).contiguous();  // R = √S·Vᵀ [r, in]
    if (i + 1 < num_iter) res = w.sub(at::mm(lora_b, lora_a));
  }
  return {q.to(weight.scalar_type()), lora_a, lora_b};
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeExplicitAutograd, m) {
  m.impl("loftq_init", &lorafuse::composite::loftq_init_composite);
}
