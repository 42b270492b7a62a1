#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/config/quant_config.h>
#include <lorafuse/ops/nf4.h>

namespace lorafuse {

void QuantConfig::validate() const {
  TORCH_CHECK_VALUE(quant_type() == "nf4", "QuantConfig: quant_type: expected \"nf4\", found \"", quant_type(), "\"");
  if (compute_dtype()) {
    const auto dtype = *compute_dtype();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                     "QuantConfig: compute_dtype: expected float32, bfloat16 or float16, found ", dtype);
  }
  // the op's own rule for the blocksize (a meta tensor: nothing is computed)
  lorafuse::quantize_nf4(at::empty({2}, at::TensorOptions().device(at::kMeta)), blocksize(), double_quant());
  for (const auto& name : modules_to_not_convert()) {
    TORCH_CHECK_VALUE(!name.empty(), "QuantConfig: modules_to_not_convert: an entry is empty");
  }
}

bool QuantConfig::keeps_dense(const std::string& path) const {
  for (const auto& name : modules_to_not_convert()) {
    if (path == name) return true;
    if (path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
        path[path.size() - name.size() - 1] == '.') {
      return true;
    }
  }
  return false;
}

}  // namespace lorafuse
