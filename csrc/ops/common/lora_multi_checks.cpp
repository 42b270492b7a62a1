#include "csrc/ops/common/lora_multi_checks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "csrc/ops/common/lora_linear_checks.h"

namespace lorafuse::detail {
namespace {

void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, ": expected int64, found ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, ": expected a 1-D tensor, found ", t.dim(), " dimensions");
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, ": expected it on x's device ", like.device(),
                    ", found ", t.device());
}

// The smallest and largest value of a non-empty int64 index tensor (read on the host).
std::pair<int64_t, int64_t> value_range(const at::Tensor& t) {
  const at::Tensor c = t.cpu().contiguous();
  const int64_t* v = c.const_data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(v, v + c.numel());
  return {*lo, *hi};
}

}  // namespace

void check_lora_segments_args(const char* op, const at::Tensor& row_adapter, int64_t num_adapters) {
  TORCH_CHECK_VALUE(num_adapters >= 1, op, ": num_adapters: expected >= 1, found ", num_adapters);
  TORCH_CHECK_TYPE(row_adapter.scalar_type() == at::kLong, op, ": row_adapter: expected int64 adapter indices, found ",
                   row_adapter.scalar_type());
  TORCH_CHECK_VALUE(row_adapter.dim() == 1, op, ": row_adapter: expected one index per row (1-D), found ",
                    row_adapter.dim(), " dimensions");
  if (row_adapter.is_meta() || row_adapter.sym_numel() == 0) return;
  const auto [low, high] = value_range(row_adapter);
  TORCH_CHECK_VALUE(low >= -1 && high < num_adapters, op, ": row_adapter: expected indices in [-1, ", num_adapters,
                    ") (-1: the base alone), found values from ", low, " to ", high);
}

void check_adapter_list(const char* op, const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                        at::TensorList lora_b, at::ArrayRef<double> scale, double dropout_p) {
  const auto n = static_cast<int64_t>(lora_a.size());
  TORCH_CHECK_VALUE(n >= 1, op, ": lora_a: expected at least one adapter, found none");
  TORCH_CHECK_VALUE(static_cast<int64_t>(lora_b.size()) == n && static_cast<int64_t>(scale.size()) == n, op,
                    ": lora_a, lora_b and scale: expected one entry per adapter, found ", n, ", ", lora_b.size(),
                    " and ", scale.size());
  for (int64_t i = 0; i < n; ++i) {
    const std::string name = std::string(op) + " (adapter " + std::to_string(i) + ")";
    check_lora_add_args(name.c_str(), base_out, x, lora_a[i], lora_b[i], scale[i], dropout_p);
  }
}

void check_lora_multi_add_args(const char* op, const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                               at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& order,
                               const at::Tensor& offsets, double dropout_p, bool values) {
  check_adapter_list(op, base_out, x, lora_a, lora_b, scale, dropout_p);
  const auto n = static_cast<int64_t>(lora_a.size());
  check_index_tensor(op, "order", order, x);
  check_index_tensor(op, "offsets", offsets, x);
  TORCH_CHECK_VALUE(offsets.size(0) == n + 1, op, ": offsets: expected ", n + 1, " entries (adapters + 1), found ",
                    offsets.size(0));
  if (!values) return;
  const at::Tensor off = offsets.cpu().contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0 && o[n] <= order.size(0), op, ": offsets: expected to run from 0 to at most order's ",
                    "length ", order.size(0), ", found ", o[0], " to ", o[n]);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(o[i] <= o[i + 1], op, ": offsets: expected non-decreasing values (lora_segments'), found ", o[i],
                      " then ", o[i + 1]);
  }
  const int64_t rows = leading_numel(x.sizes());
  TORCH_CHECK_VALUE(order.size(0) <= rows, op, ": order: expected at most one entry per row of x (", rows,
                    " rows), found ", order.size(0));
  if (order.numel() == 0) return;
  // plain loops over the indices (on the host: one small copy from another device), no ATen reductions: this runs in
  // every layer of a mixed batch
  const at::Tensor ord = order.cpu().contiguous();
  const int64_t* v = ord.const_data_ptr<int64_t>();
  const auto [low, high] = value_range(ord);
  TORCH_CHECK_VALUE(low >= 0 && high < rows, op, ": order: expected row indices in [0, ", rows, "), found values from ",
                    low, " to ", high);
  std::vector<int64_t> count(static_cast<size_t>(rows), 0);
  int64_t most = 0;
  for (int64_t j = 0; j < ord.numel(); ++j) most = std::max(most, ++count[static_cast<size_t>(v[j])]);
  TORCH_CHECK_VALUE(most <= 1, op, ": order: a row is listed ", most, " times; expected each row once at most (as ",
                    "lora_segments gives it)");
}

void check_lora_token_add_args(const char* op, const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                               at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& row_adapter,
                               bool values) {
  check_adapter_list(op, base_out, x, lora_a, lora_b, scale, 0.0);
  check_index_tensor(op, "row_adapter", row_adapter, x);
  const int64_t rows = leading_numel(x.sizes());
  TORCH_CHECK_VALUE(row_adapter.size(0) == rows, op, ": row_adapter: expected one adapter index per row of x (", rows,
                    " rows), found ", row_adapter.size(0));
  if (values) check_lora_segments_args(op, row_adapter, static_cast<int64_t>(lora_a.size()));
}

void check_lora_multi_add_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                        at::TensorList lora_a, at::TensorList lora_b, at::ArrayRef<double> scale,
                                        const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& rng_state,
                                        double dropout_p) {
  check_lora_multi_add_args(op, grad_out, x, lora_a, lora_b, scale, order, offsets, dropout_p, /*values=*/true);
  TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong, op,
                    ": rng_state: expected int64 [2] (lora_multi_add_forward's), found ", rng_state.scalar_type(), " ",
                    rng_state.sizes());
}

}  // namespace lorafuse::detail
