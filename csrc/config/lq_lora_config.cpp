#include <c10/util/Exception.h>
#include <lorafuse/config/lq_lora_config.h>
#include <lorafuse/ops/nf.h>

#include <cmath>
#include <sstream>

namespace lorafuse {

double QuantChoice::bits_per_weight() const { return nf_bits_per_weight(format, stat_dtype); }

std::string QuantChoice::name() const {
  std::ostringstream s;
  s << "nf" << (format.size() > 0 ? format[0] : 0) << "-b" << (format.size() > 1 ? format[1] : 0);
  if (format.size() == 4 && format[2] > 0) {
    s << "-s" << format[2] << "x" << format[3] << "-"
      << (stat_dtype == c10::ScalarType::Float  ? "fp32"
          : stat_dtype == c10::ScalarType::Half ? "fp16"
                                                : "bf16");
  }
  return s.str();
}

std::vector<QuantChoice> lq_default_grid() {
  std::vector<QuantChoice> grid;
  for (const int64_t b : {2, 3, 4, 8}) {
    for (const int64_t b0 : {16, 32, 64}) grid.push_back({{b, b0, 8, 256}, c10::ScalarType::Float});
  }
  return grid;
}

std::vector<QuantChoice> lq_paper_grid() {
  std::vector<QuantChoice> grid;
  for (const int64_t b : {2, 3, 4, 8}) {
    for (const int64_t b0 : {2, 3, 4, 8}) {
      for (const auto dtype : {c10::ScalarType::BFloat16, c10::ScalarType::Half, c10::ScalarType::Float}) {
        for (const int64_t block0 : {16, 32, 64}) {
          for (const int64_t block1 : {16, 64, 256}) grid.push_back({{b, block0, b0, block1}, dtype});
        }
      }
    }
  }
  return grid;
}

void LqLoraConfig::validate() const {
  TORCH_CHECK_VALUE(!configs().empty(), "LqLoraConfig: configs: expected at least one configuration, found none");
  for (size_t i = 0; i < configs().size(); ++i) {
    try {
      configs()[i].bits_per_weight();  // checks the format and the dtype
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, "LqLoraConfig: configs[", i, "]: ", e.what_without_backtrace());
    }
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(!(configs()[j] == configs()[i]), "LqLoraConfig: configs: ", configs()[i].name(),
                        " is listed twice (entries ", j, " and ", i, ")");
    }
  }
  if (budget_bits().has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*budget_bits()) && *budget_bits() > 0, "LqLoraConfig: budget_bits: expected a ",
                      "finite value > 0, found ", *budget_bits());
  } else {
    TORCH_CHECK_VALUE(configs().size() == 1, "LqLoraConfig: budget_bits: without a budget (uniform quantization), ",
                      "configs must hold one configuration, found ", configs().size());
  }
  TORCH_CHECK_VALUE(r() >= 1, "LqLoraConfig: r: expected >= 1, found ", r());
  TORCH_CHECK_VALUE(std::isfinite(lora_alpha()) && lora_alpha() > 0, "LqLoraConfig: lora_alpha: expected a finite ",
                    "value > 0, found ", lora_alpha());
  TORCH_CHECK_VALUE(max_iters() >= 1, "LqLoraConfig: max_iters: expected >= 1, found ", max_iters());
  TORCH_CHECK_VALUE(std::isfinite(tol()) && tol() >= 0, "LqLoraConfig: tol: expected a finite value >= 0, found ",
                    tol());
  TORCH_CHECK_VALUE(oversampling() >= 0 && power_iters() >= 0,
                    "LqLoraConfig: oversampling and power_iters: expected >= 0, found ", oversampling(), " and ",
                    power_iters());
  TORCH_CHECK_VALUE(threads() >= 0, "LqLoraConfig: threads: expected >= 0 (0: ATen's thread count), found ", threads());
}

}  // namespace lorafuse
