// The C++ rules of LoraConfig and adapter options for the Python front (validation and target selection), so
// that C++ and Python select the same layers.
#include "csrc/python/convert.h"

namespace lorafuse::python {

void bind_config(py::module& m) {
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
