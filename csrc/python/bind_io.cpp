// Adapter files and safetensors for the Python front (the one C++ implementation of the formats).
#include "csrc/python/convert.h"

#include <lorafuse/io/adapter.h>
#include <lorafuse/io/safetensors.h>

#include <map>

namespace lorafuse::python {

void bind_io(py::module& m) {
  using Modules = ModuleTuples;
  m.def(
      "_read_adapter",
      [](const std::string& dir) { return adapter_file_dict(translating([&] { return io::read_adapter(dir); })); },
      py::arg("dir"),
      "The adapter in a folder, validated: {config, config_json, layers [(path, A, B)], magnitudes {path: DoRA "
      "magnitude}, biases, warnings}.");
  m.def(
      "_plan_adapter_load",
      [](const std::string& dir, const Modules& modules, bool partial) {
        const auto file = translating([&] { return io::read_adapter(dir); });
        const auto plan = translating([&] { return io::plan_adapter_load(file, infos_from(modules), partial); });
        py::dict out = adapter_file_dict(file);
        py::list targets;
        for (const auto& t : plan) {
          targets.append(py::make_tuple(t.index, nn::adapter_options_json(t.adapter), t.lora_A, t.lora_B,
                                        t.magnitude.defined() ? py::cast(t.magnitude) : py::none(),
                                        t.base_weight.defined() ? py::cast(t.base_weight) : py::none()));
        }
        out["targets"] = targets;
        return out;
      },
      py::arg("dir"), py::arg("modules"), py::arg("partial"),
      "Reads the adapter in `dir` and matches it against modules (path, type, is_linear, in, out): the "
      "(index, adapter options, A, B, DoRA magnitude or None, base weight or None) to load, every loading rule "
      "checked.");
  m.def(
      "_save_adapter",
      [](const std::string& dir, const Modules& modules,
         const std::vector<
             std::tuple<size_t, nn::LoraAdapterOptions, at::Tensor, at::Tensor, std::optional<at::Tensor>>>& layers,
         const std::vector<std::pair<std::string, at::Tensor>>& biases, const std::string& base_model_name_or_path,
         bool fan_in_fan_out) {
        std::vector<io::SaveSource> sources;
        for (const auto& [index, opts, a, b, m] : layers)
          sources.push_back({index, opts, a, b, m.value_or(at::Tensor())});
        translating([&] {
          auto file = io::describe_adapter(infos_from(modules), sources, biases);
          file.base_model_name_or_path = base_model_name_or_path;
          file.config.fan_in_fan_out(fan_in_fan_out);
          io::write_adapter(dir, file);
        });
      },
      py::arg("dir"), py::arg("modules"), py::arg("layers"), py::arg("biases"), py::arg("base_model_name_or_path"),
      py::arg("fan_in_fan_out") = false,
      "Writes an adapter folder (PEFT's format, atomically) for these layers (index, options, A, B, DoRA magnitude or "
      "None) of modules.");
  m.def(
      "_read_safetensors",
      [](const std::string& path) {
        auto file = translating([&] { return io::read_safetensors(path); });
        return py::make_tuple(file.tensors, file.metadata);
      },
      py::arg("path"), "([(name, tensor)] in file order, metadata) of a safetensors file, every rule checked.");
  m.def(
      "_write_safetensors",
      [](const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
         const std::map<std::string, std::string>& metadata) {
        translating([&] { io::write_safetensors(path, tensors, metadata); });
      },
      py::arg("path"), py::arg("tensors"), py::arg("metadata") = std::map<std::string, std::string>{},
      "Writes a safetensors file atomically (temporary file, flush, rename).");
}

}  // namespace lorafuse::python
