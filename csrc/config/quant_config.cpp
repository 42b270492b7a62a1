#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/config/quant_config.h>
#include <lorafuse/ops/nf.h>
#include <lorafuse/ops/nf4.h>

#include <nlohmann/json.hpp>

#include "csrc/config/json.h"

namespace lorafuse {
namespace {

using json = nlohmann::ordered_json;

constexpr std::pair<const char*, c10::ScalarType> kComputeDtypes[] = {
    {"float32", at::kFloat}, {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}};

std::optional<c10::ScalarType> compute_dtype_named(const json& value, const std::string& what) {
  if (value.is_null()) return std::nullopt;
  TORCH_CHECK_VALUE(value.is_string(), what, ": bnb_4bit_compute_dtype: expected a dtype name, found ", value.dump());
  std::string name = value.get<std::string>();
  if (name.rfind("torch.", 0) == 0) name = name.substr(6);
  for (const auto& [n, dtype] : kComputeDtypes) {
    if (name == n) return dtype;
  }
  TORCH_CHECK_TYPE(false, what, ": bnb_4bit_compute_dtype: expected \"float32\", \"bfloat16\" or \"float16\", found ",
                   value.dump());
}

const char* compute_dtype_name(c10::ScalarType dtype) {
  for (const auto& [n, d] : kComputeDtypes) {
    if (d == dtype) return n;
  }
  TORCH_CHECK_TYPE(false, "QuantConfig: compute_dtype: expected float32, bfloat16 or float16, found ", dtype);
}

bool flag(const json& j, const char* key, const std::string& what) {
  if (!j.contains(key) || j[key].is_null()) return false;
  TORCH_CHECK_VALUE(j[key].is_boolean(), what, ": ", key, ": expected true or false, found ", j[key].dump());
  return j[key].get<bool>();
}

}  // namespace

QuantConfig QuantConfig::from_hf_json(const std::string& json_text, const std::string& what) {
  const json j = lorafuse::detail::parse_json<json>(json_text, what);
  TORCH_CHECK_VALUE(j.is_object(), what, ": expected a JSON object, found ", j.type_name());
  const std::string method = j.contains("quant_method") && j["quant_method"].is_string()
                                 ? j["quant_method"].get<std::string>()
                                 : (j.contains("quant_method") ? j["quant_method"].dump() : "(none)");
  TORCH_CHECK_VALUE(method == "bitsandbytes", what,
                    ": quant_method: lorafuse loads bitsandbytes' 4-bit NF4 "
                    "checkpoints; found ",
                    method);
  TORCH_CHECK_VALUE(!flag(j, "load_in_8bit", what), what,
                    ": load_in_8bit: bitsandbytes' 8-bit (LLM.int8) checkpoints are not supported; lorafuse loads "
                    "4-bit NF4 ones");
  TORCH_CHECK_VALUE(flag(j, "load_in_4bit", what), what, ": load_in_4bit: expected true (a 4-bit checkpoint)");
  QuantConfig c;
  if (j.contains("bnb_4bit_quant_type")) {
    const auto& t = j["bnb_4bit_quant_type"];
    TORCH_CHECK_VALUE(t.is_string() && t.get<std::string>() == "nf4", what,
                      ": bnb_4bit_quant_type: lorafuse has NF4 kernels only; expected \"nf4\", found ", t.dump());
  }
  c.double_quant(flag(j, "bnb_4bit_use_double_quant", what));
  if (j.contains("bnb_4bit_compute_dtype")) c.compute_dtype(compute_dtype_named(j["bnb_4bit_compute_dtype"], what));
  if (j.contains("llm_int8_skip_modules") && !j["llm_int8_skip_modules"].is_null()) {
    const auto& skip = j["llm_int8_skip_modules"];
    TORCH_CHECK_VALUE(skip.is_array(), what, ": llm_int8_skip_modules: expected a list of module names, found ",
                      skip.dump());
    std::vector<std::string> names;
    for (const auto& n : skip) {
      TORCH_CHECK_VALUE(n.is_string(), what, ": llm_int8_skip_modules: expected names, found ", n.dump());
      names.push_back(n.get<std::string>());
    }
    c.modules_to_not_convert(std::move(names));
  }
  c.validate();
  return c;
}

std::string QuantConfig::to_hf_json(const std::vector<std::string>& dense_modules) const {
  TORCH_CHECK_VALUE(bits() == 4, "QuantConfig: quant_type \"", quant_type(),
                    "\": transformers' quantization_config describes bitsandbytes' NF4 only");
  validate();
  json j = json::object();
  j["quant_method"] = "bitsandbytes";
  j["load_in_4bit"] = true;
  j["load_in_8bit"] = false;
  j["bnb_4bit_quant_type"] = quant_type();
  j["bnb_4bit_use_double_quant"] = double_quant();
  j["bnb_4bit_compute_dtype"] = compute_dtype_name(compute_dtype().value_or(at::kFloat));
  j["bnb_4bit_quant_storage"] = "uint8";
  j["llm_int8_skip_modules"] = dense_modules;
  j["llm_int8_threshold"] = 6.0;
  j["llm_int8_has_fp16_weight"] = false;
  j["llm_int8_enable_fp32_cpu_offload"] = false;
  return j.dump();
}

int64_t QuantConfig::bits() const {
  const std::string& t = quant_type();
  return t.size() == 3 && t[0] == 'n' && t[1] == 'f' && t[2] >= '2' && t[2] <= '8' ? t[2] - '0' : 0;
}

void QuantConfig::validate() const {
  TORCH_CHECK_VALUE(bits() != 0,
                    "QuantConfig: quant_type: expected \"nf4\" (or \"nf2\", \"nf3\", \"nf5\" ... \"nf8\"), "
                    "found \"",
                    quant_type(), "\"");
  if (compute_dtype()) {
    const auto dtype = *compute_dtype();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                     "QuantConfig: compute_dtype: expected float32, bfloat16 or float16, found ", dtype);
  }
  // the op's own rule for the blocksize (a meta tensor: nothing is computed)
  const at::Tensor meta = at::empty({2}, at::TensorOptions().device(at::kMeta));
  if (bits() == 4) {
    lorafuse::quantize_nf4(meta, blocksize(), double_quant());
  } else {
    lorafuse::quantize_nf(meta, {bits(), blocksize(), double_quant() ? 8 : 0, double_quant() ? 256 : 0});
  }
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
