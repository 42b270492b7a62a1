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
        const auto infos = infos_from(modules);
        const auto plan = translating([&] { return io::plan_adapter_load(file, infos, partial); });
        std::vector<std::string> warnings = file.warnings;
        const auto saved =
            translating([&] { return io::plan_saved_modules_load(file, infos, partial, warnings, plan); });
        py::dict out = adapter_file_dict(file);
        out["warnings"] = warnings;
        py::list saved_out;
        for (const auto& s : saved) {
          saved_out.append(
              py::make_tuple(s.index, nn::adapter_options_json(file.config.adapter_for(infos[s.index].path)), s.state));
        }
        out["saved"] = saved_out;
        py::list targets;
        for (const auto& t : plan) {
          targets.append(py::make_tuple(t.index, nn::adapter_options_json(t.adapter), t.lora_A, t.lora_B,
                                        t.magnitude.defined() ? py::cast(t.magnitude) : py::none(),
                                        t.base_weight.defined() ? py::cast(t.base_weight) : py::none(), t.out_proj));
        }
        out["targets"] = targets;
        return out;
      },
      py::arg("dir"), py::arg("modules"), py::arg("partial"),
      "Reads the adapter in `dir` and matches it against modules (ModuleTuples): \"targets\", the "
      "(index, adapter options, A, B, DoRA magnitude or None, base weight or None, out_proj: an attention module's "
      "output projection) to load, and \"saved\", the "
      "(index, adapter options, [(key, tensor)]) of each module that modules_to_save trains whole, every loading rule "
      "checked.");
  m.def(
      "_save_adapter",
      [](const std::string& dir, const Modules& modules,
         const std::vector<std::tuple<size_t, nn::LoraAdapterOptions, at::Tensor, at::Tensor, std::optional<at::Tensor>,
                                      bool>>& layers,
         const std::vector<std::pair<std::string, at::Tensor>>& biases, const std::string& base_model_name_or_path,
         bool fan_in_fan_out, const SavedTuples& saved) {
        std::vector<io::SaveSource> sources;
        for (const auto& [index, opts, a, b, m, out_proj] : layers)
          sources.push_back({index, opts, a, b, m.value_or(at::Tensor()), out_proj});
        translating([&] {
          std::vector<io::SavedModule> saved_modules;
          for (const auto& [path, state] : saved) saved_modules.push_back({path, state});
          auto file = io::describe_adapter(infos_from(modules), sources, biases, std::move(saved_modules));
          file.base_model_name_or_path = base_model_name_or_path;
          file.config.fan_in_fan_out(fan_in_fan_out);
          io::write_adapter(dir, file);
        });
      },
      py::arg("dir"), py::arg("modules"), py::arg("layers"), py::arg("biases"), py::arg("base_model_name_or_path"),
      py::arg("fan_in_fan_out") = false, py::arg("saved") = SavedTuples{},
      "Writes an adapter folder (PEFT's format, atomically) for these layers (index, options, A, B, DoRA magnitude or "
      "None, out_proj: an attention module's output projection) of modules, with the modules it trains whole (path, "
      "[(key, tensor)]).");
  m.def(
      "_check_saved_state",
      [](const std::string& path, const std::vector<std::pair<std::string, std::vector<int64_t>>>& own,
         const std::vector<std::pair<std::string, at::Tensor>>& state) {
        translating([&] { io::check_saved_state(path, own, state); });
      },
      py::arg("path"), py::arg("own"), py::arg("state"),
      "Raises ValueError unless a file's state of a module kept whole (modules_to_save) has the module's keys and "
      "shapes (own: [(key, shape)]).");
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
