#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/quant/nf_code.h>

#include <algorithm>

#include "cuda/shared/nf_code.h"

namespace lorafuse {

at::Tensor nf_code(int64_t bits) {
  TORCH_CHECK_VALUE(bits >= nf::kMinBits && bits <= nf::kMaxBits, "nf_code: bits must be in [", nf::kMinBits, ", ",
                    nf::kMaxBits, "], found ", bits);
  const auto values = nf::code(static_cast<int>(bits));
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::kFloat);
  std::copy(values.begin(), values.end(), out.mutable_data_ptr<float>());
  return out;
}

}  // namespace lorafuse
