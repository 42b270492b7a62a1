#include "csrc/ops/common/lora_multi_backward.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "csrc/ops/common/lora_linear_checks.h"

namespace lorafuse::detail {

void for_each_segment(const at::Tensor& offsets, const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  const at::Tensor off = offsets.cpu().contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  for (int64_t i = 0; i + 1 < off.numel(); ++i) {
    if (o[i + 1] > o[i]) fn(i, o[i], o[i + 1] - o[i]);
  }
}

at::Tensor adapter_rows(const at::Tensor& order, const at::Tensor& offsets) {
  return order.narrow(0, 0, offsets[offsets.size(0) - 1].item<int64_t>()).contiguous();
}

at::Tensor segment_rows(const at::Tensor& sorted, const at::Tensor& order, int64_t start, int64_t n, at::ScalarType acc,
                        const RowMask& mask) {
  at::Tensor xs = sorted.narrow(0, start, n).to(acc);
  if (mask) {
    xs = xs.clone(at::MemoryFormat::Contiguous);
    mask(xs, order.narrow(0, start, n).contiguous());
  }
  return xs;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
    at::ArrayRef<double> scale, const at::Tensor& order, const at::Tensor& offsets, std::array<bool, 3> output_mask,
    const RowMask& mask) {
  const int64_t in = x.size(-1), out = grad_out.size(-1);
  const int64_t tokens = leading_numel(x.sizes());
  const at::Tensor x2 = x.reshape({tokens, in});
  const at::Tensor dy2 = grad_out.reshape({tokens, out});
  at::Tensor gx = output_mask[0] ? at::zeros({tokens, in}, x.options()) : at::empty({0}, x.options());
  std::vector<at::Tensor> ga, gb;
  for (size_t i = 0; i < lora_a.size(); ++i) {
    ga.push_back(output_mask[1] ? at::zeros_like(lora_a[i]) : at::empty({0}, lora_a[i].options()));
    gb.push_back(output_mask[2] ? at::zeros_like(lora_b[i]) : at::empty({0}, lora_b[i].options()));
  }
  if (output_mask[0] || output_mask[1] || output_mask[2]) {
    const at::Tensor rows = adapter_rows(order, offsets);
    const at::Tensor sorted = x2.index_select(0, rows), sorted_dy = dy2.index_select(0, rows);
    at::Tensor gx_sorted = output_mask[0] ? at::empty({rows.size(0), in}, x.options()) : at::Tensor();
    for_each_segment(offsets, [&](int64_t i, int64_t start, int64_t n) {
      const at::ScalarType acc = lora_acc_dtype(x, lora_a[i]);
      const at::Tensor a = lora_a[i].to(acc), b = lora_b[i].to(acc);
      const at::Tensor dys = sorted_dy.narrow(0, start, n).to(acc);  // [n, out]
      const at::Tensor v = at::mm(dys, b).mul_(scale[i]);            // dL/du [n, r]
      if (output_mask[1] || output_mask[2]) {
        const at::Tensor xs = segment_rows(sorted, order, start, n, acc, mask);  // [n, in]
        if (output_mask[1]) ga[i] = at::mm(v.t(), xs).to(lora_a[i].scalar_type());
        if (output_mask[2]) gb[i] = at::mm(dys.t(), at::mm(xs, a.t())).mul_(scale[i]).to(lora_b[i].scalar_type());
      }
      if (output_mask[0]) {
        at::Tensor gxs = at::mm(v, a);  // [n, in]
        if (mask) mask(gxs, order.narrow(0, start, n).contiguous());
        gx_sorted.narrow(0, start, n).copy_(gxs);
      }
    });
    if (output_mask[0]) gx.index_copy_(0, rows, gx_sorted);
  }
  if (output_mask[0]) gx = gx.view(x.sizes());
  return {gx, ga, gb};
}

}  // namespace lorafuse::detail
