// The C++ rules of LoraConfig and adapter options for the Python front (validation and target selection), so
// that C++ and Python select the same layers.
#include "csrc/python/convert.h"

#include <lorafuse/config/quant_config.h>
#include <lorafuse/quant/quantize_model.h>

namespace lorafuse::python {

namespace {

QuantConfig quant_config(const std::string& quant_type, int64_t blocksize, bool double_quant,
                         std::optional<at::ScalarType> compute_dtype, const std::vector<std::string>& skip) {
  return QuantConfig()
      .quant_type(quant_type)
      .blocksize(blocksize)
      .double_quant(double_quant)
      .compute_dtype(compute_dtype)
      .modules_to_not_convert(skip);
}

}  // namespace

void bind_config(py::module& m) {
  m.def(
      "_validate_quant_config",
      [](const std::string& quant_type, int64_t blocksize, bool double_quant, std::optional<at::ScalarType> dtype,
         const std::vector<std::string>& skip) {
        translating([&] { quant_config(quant_type, blocksize, double_quant, dtype, skip).validate(); });
      },
      py::arg("quant_type"), py::arg("blocksize"), py::arg("double_quant"), py::arg("compute_dtype"),
      py::arg("modules_to_not_convert"), "Raises ValueError / TypeError unless the lorafuse.QuantConfig fields are valid.");
  m.def(
      "_quant_keeps_dense",
      [](const std::string& path, const std::vector<std::string>& skip) {
        return QuantConfig().modules_to_not_convert(skip).keeps_dense(path);
      },
      py::arg("path"), py::arg("modules_to_not_convert"),
      "Whether quantize_model leaves the layer at `path` dense (QuantConfig::keeps_dense).");
  m.def(
      "_cpp_quantize_model",
      [](torch::nn::Module& module, const std::string& quant_type, int64_t blocksize, bool double_quant,
         std::optional<at::ScalarType> dtype, const std::vector<std::string>& skip) {
        return translating(
            [&] { return quantize_model(module, quant_config(quant_type, blocksize, double_quant, dtype, skip)); });
      },
      py::arg("module"), py::arg("quant_type"), py::arg("blocksize"), py::arg("double_quant"), py::arg("compute_dtype"),
      py::arg("modules_to_not_convert"), "lorafuse::quantize_model on a bound C++ module; the paths quantized.");
  m.def(
      "_validate_lora_config", [](const std::string& config) { translating([&] { config_from(config).validate(); }); },
      "Raises ValueError / TypeError unless the lorafuse.LoraConfig fields (a dict) are valid.");
  m.def(
      "_validate_adapter",
      [](const std::string& name, int64_t r, double lora_alpha, double lora_dropout) {
        translating([&] {
          nn::check_adapter_name(name);
          nn::LoraAdapterOptions(r).lora_alpha(lora_alpha).lora_dropout(lora_dropout).validate();
        });
      },
      py::arg("name"), py::arg("r"), py::arg("lora_alpha"), py::arg("lora_dropout"),
      "Raises ValueError unless an adapter with this name and these options can be made (the C++ rules).");
  m.def(
      "_select_targets",
      [](const std::vector<std::tuple<std::string, std::string, bool>>& modules, const std::string& config) {
        std::vector<ModuleInfo> infos;
        infos.reserve(modules.size());
        for (const auto& [path, type_name, is_linear] : modules) infos.push_back({path, type_name, is_linear});
        const auto chosen = translating([&] { return select_targets(infos, config_from(config)); });
        py::list out;
        for (const auto& c : chosen) out.append(py::make_tuple(c.index, nn::adapter_options_json(c.adapter)));
        return out;
      },
      "The (index, adapter options) of the modules (path, type name, is_linear) that a config selects: the "
      "selection rules of C++ inject_lora.");
}

}  // namespace lorafuse::python
