// CPU kernels of lora_multi_add: adapter by adapter, its rows gathered (cast to the accumulation dtype and masked with
// their own rows' dropout words), the shrink and expand as lora_add computes them (add_expand_), the rows written back.
// Backward: the same gathers, each adapter's gradients from its rows alone.
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

#include "csrc/ops/common/lora_linear_checks.h"
#include "csrc/ops/common/lora_multi_checks.h"
#include "csrc/ops/cpu/dropout_cpu.h"
#include "csrc/ops/cpu/lora_linear_cpu.h"

namespace lorafuse::cpu {
namespace {

constexpr const char* kOp = "lorafuse.lora_multi_add";

// A segment's rows of `sorted` (the batch's rows gathered once in segment order), [start, start + n), in `acc`, masked
// with the dropout words of their own rows in the batch (order[start ...]): what lora_add's shrink multiplies for
// those rows. A new tensor when masked.
at::Tensor segment_rows(const at::Tensor& sorted, const at::Tensor& order, int64_t start, int64_t n, at::ScalarType acc,
                        uint64_t seed, double p) {
  at::Tensor xs = sorted.narrow(0, start, n).to(acc);
  if (p > 0.0) {
    xs = xs.clone(at::MemoryFormat::Contiguous);
    dropout_mask_(xs, seed, /*offset=*/0, p, order.narrow(0, start, n).contiguous().const_data_ptr<int64_t>());
  }
  return xs;
}

// Runs fn(i, start, n) for every adapter i with n > 0 rows in the batch (order[start : start + n]).
template <class Fn>
void for_each_segment(const at::Tensor& offsets, Fn&& fn) {
  const at::Tensor off = offsets.contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  for (int64_t i = 0; i + 1 < off.numel(); ++i) {
    if (o[i + 1] > o[i]) fn(i, o[i], o[i + 1] - o[i]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_multi_add_forward_cpu(const at::Tensor& base_out, const at::Tensor& x,
                                                              at::TensorList lora_a, at::TensorList lora_b,
                                                              at::ArrayRef<double> scale, const at::Tensor& order,
                                                              const at::Tensor& offsets, double dropout_p) {
  detail::check_lora_multi_add_args(kOp, base_out, x, lora_a, lora_b, scale, order, offsets, dropout_p,
                                    /*values=*/true);
  const int64_t in = x.size(-1), out = base_out.size(-1);
  const int64_t tokens = detail::leading_numel(x.sizes());
  uint64_t seed = 0;
  at::Tensor rng_state = forward_rng_state(x, dropout_p, seed);
  const at::Tensor x2 = x.reshape({tokens, in});
  at::Tensor y2 = base_out.reshape({tokens, out}).clone(at::MemoryFormat::Contiguous);
  // the rows gathered once in segment order, each segment's branch into its slice of delta, then one scatter-add
  // (each row once): y = base_out + delta, delta rounded to y's dtype first for 16-bit outputs as lora_add does
  const at::Tensor sorted = x2.index_select(0, order);  // [T', in]
  const at::ScalarType delta_dtype = y2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor delta = at::empty({order.size(0), out}, y2.options().dtype(delta_dtype));
  for_each_segment(offsets, [&](int64_t i, int64_t start, int64_t n) {
    const at::ScalarType acc = detail::lora_acc_dtype(x, lora_a[i]);
    const at::Tensor u = at::mm(segment_rows(sorted, order, start, n, acc, seed, dropout_p), lora_a[i].to(acc).t());
    delta.narrow(0, start, n).copy_(at::mm(u, lora_b[i].to(acc).t()).mul_(scale[i]));  // [n, out]
  });
  y2.index_add_(0, order, delta.to(y2.scalar_type()));
  return {y2.view(base_out.sizes()), rng_state};
}

at::Tensor lora_multi_add_cpu(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                              at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& order,
                              const at::Tensor& offsets, double dropout_p) {
  return std::get<0>(lora_multi_add_forward_cpu(base_out, x, lora_a, lora_b, scale, order, offsets, dropout_p));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_add_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
    at::ArrayRef<double> scale, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& rng_state,
    double dropout_p, std::array<bool, 3> output_mask) {
  constexpr const char* op = "lorafuse.lora_multi_add_backward";
  detail::check_lora_multi_add_args(op, grad_out, x, lora_a, lora_b, scale, order, offsets, dropout_p,
                                    /*values=*/true);
  TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong, op,
                    ": rng_state: expected int64 [2] (lora_multi_add_forward's), found ", rng_state.scalar_type(), " ",
                    rng_state.sizes());
  const int64_t in = x.size(-1), out = grad_out.size(-1);
  const int64_t tokens = detail::leading_numel(x.sizes());
  const auto seed = static_cast<uint64_t>(rng_state.cpu().const_data_ptr<int64_t>()[0]);
  const at::Tensor x2 = x.reshape({tokens, in});
  const at::Tensor dy2 = grad_out.reshape({tokens, out});
  at::Tensor gx = output_mask[0] ? at::zeros({tokens, in}, x.options()) : at::empty({0}, x.options());
  std::vector<at::Tensor> ga, gb;
  for (size_t i = 0; i < lora_a.size(); ++i) {
    ga.push_back(output_mask[1] ? at::zeros_like(lora_a[i]) : at::empty({0}, lora_a[i].options()));
    gb.push_back(output_mask[2] ? at::zeros_like(lora_b[i]) : at::empty({0}, lora_b[i].options()));
  }
  if (output_mask[0] || output_mask[1] || output_mask[2]) {
    const at::Tensor sorted = x2.index_select(0, order), sorted_dy = dy2.index_select(0, order);
    at::Tensor gx_sorted = output_mask[0] ? at::empty({order.size(0), in}, x.options()) : at::Tensor();
    for_each_segment(offsets, [&](int64_t i, int64_t start, int64_t n) {
      const at::ScalarType acc = detail::lora_acc_dtype(x, lora_a[i]);
      const at::Tensor a = lora_a[i].to(acc), b = lora_b[i].to(acc);
      const at::Tensor dys = sorted_dy.narrow(0, start, n).to(acc);  // [n, out]
      const at::Tensor v = at::mm(dys, b).mul_(scale[i]);            // dL/du [n, r]
      if (output_mask[1] || output_mask[2]) {
        const at::Tensor xs = segment_rows(sorted, order, start, n, acc, seed, dropout_p);  // [n, in]
        if (output_mask[1]) ga[i] = at::mm(v.t(), xs).to(lora_a[i].scalar_type());
        if (output_mask[2]) gb[i] = at::mm(dys.t(), at::mm(xs, a.t())).mul_(scale[i]).to(lora_b[i].scalar_type());
      }
      if (output_mask[0]) {
        at::Tensor gxs = at::mm(v, a);  // [n, in]
        if (dropout_p > 0.0) {
          dropout_mask_(gxs, seed, /*offset=*/0, dropout_p,
                        order.narrow(0, start, n).contiguous().const_data_ptr<int64_t>());
        }
        gx_sorted.narrow(0, start, n).copy_(gxs);
      }
    });
    if (output_mask[0]) gx.index_copy_(0, order, gx_sorted);
  }
  if (output_mask[0]) gx = gx.view(x.sizes());
  return {gx, ga, gb};
}

}  // namespace lorafuse::cpu

TORCH_LIBRARY_IMPL(lorafuse, CPU, m) {
  m.impl("lora_multi_add", &lorafuse::cpu::lora_multi_add_cpu);
  m.impl("lora_multi_add_forward", &lorafuse::cpu::lora_multi_add_forward_cpu);
  m.impl("lora_multi_add_backward", &lorafuse::cpu::lora_multi_add_backward_cpu);
}
