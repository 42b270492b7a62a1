// lora_segments: a batch's rows grouped by adapter (CompositeExplicitAutograd: a stable sort and a bincount, on
// whatever device the indices are; only the index check reads them back), and its Meta kernel (the shapes are static).
#include <ATen/ops/bincount.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "csrc/ops/common/lora_multi_checks.h"

namespace lorafuse::composite {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_segments_composite(const at::Tensor& row_adapter, int64_t num_adapters) {
  detail::check_lora_segments_args("lorafuse.lora_segments", row_adapter, num_adapters);
  // the base's rows (-1) sort last, as a key past every adapter: order[offsets[n]:] lists them
  const at::Tensor keys = at::where(row_adapter.lt(0), at::full_like(row_adapter, num_adapters), row_adapter);
  const at::Tensor order = std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::bincount(keys, {}, num_adapters + 1).narrow(0, 0, num_adapters);
  const at::Tensor offsets = at::cat({at::zeros({1}, row_adapter.options()), counts.cumsum(0)});
  return {order, offsets};
}

std::tuple<at::Tensor, at::Tensor> lora_segments_meta(const at::Tensor& row_adapter, int64_t num_adapters) {
  detail::check_lora_segments_args("lorafuse.lora_segments", row_adapter, num_adapters);
  return {at::empty_like(row_adapter), at::empty({num_adapters + 1}, row_adapter.options())};
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeExplicitAutograd, m) {
  m.impl("lora_segments", &lorafuse::composite::lora_segments_composite);
}

TORCH_LIBRARY_IMPL(lorafuse, Meta, m) { m.impl("lora_segments", &lorafuse::composite::lora_segments_meta); }
