// Model-wide functions on bound C++ models: what lorafuse.inject_lora & co. run for them, one binding per function.
#include "csrc/python/convert.h"

#include <lorafuse/peft/adapters.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/peft/rules.h>

namespace lorafuse::python {

namespace {

// (path, table) pairs from Python; None for a table is a TypeError naming the path, not a null pointer.
using TablesArg = std::vector<std::pair<std::string, const nn::AdapterTable*>>;
rules::LayerTables checked(const TablesArg& layers) {
  for (const auto& [path, table] : layers) {
    if (table == nullptr) throw py::type_error("layers: \"" + path + "\" has no adapter table (found None)");
  }
  return layers;
}

// The model-wide rules over the tables of Python layers (lorafuse.peft plans with these, then acts on its layers).
void bind_rules(py::module& m) {
  using LayerTables = TablesArg;
  const auto layers = py::arg("layers");
  m.def(
      "_rules_adapter_names", [](const LayerTables& l) { return rules::adapter_names(checked(l)); }, layers);
  m.def(
      "_rules_active_adapter", [](const LayerTables& l) { return rules::active_adapter(checked(l)); }, layers);
  m.def(
      "_rules_require_adapter",
      [](const LayerTables& l, const std::string& name, const std::string& what) {
        translating([&] { rules::require_adapter(checked(l), name, what); });
      },
      layers, py::arg("name"), py::arg("what"));
  m.def(
      "_rules_plan_set_adapter",
      [](const LayerTables& l, const std::string& name) {
        return translating([&] { return rules::plan_set_adapter(checked(l), name); });
      },
      layers, py::arg("name"));
  m.def(
      "_rules_plan_delete_adapter",
      [](const LayerTables& l, const std::string& name) {
        return translating([&] { return rules::plan_delete_adapter(checked(l), name); });
      },
      layers, py::arg("name"));
  m.def(
      "_rules_plan_merge",
      [](const LayerTables& l, const std::vector<std::string>& names, const std::string& what) {
        return warning_in_python([&] { return rules::plan_merge(checked(l), names, what); });
      },
      layers, py::arg("names"), py::arg("what"));
  m.def(
      "_rules_check_not_tied",
      [](const std::vector<std::pair<std::string, int64_t>>& parameters, const std::vector<std::string>& merging,
         const std::string& what, const std::string& consequence) {
        translating([&] { rules::check_not_tied(parameters, merging, what, consequence); });
      },
      py::arg("parameters"), py::arg("merging"), py::arg("what"), py::arg("consequence") = "",
      "Refuses merging into (or copying) a weight another module holds too (rules::check_not_tied): parameters are "
      "(name, id).");
  m.def(
      "_rules_check_unmerge",
      [](const LayerTables& l, const std::string& what) {
        translating([&] { rules::check_unmerge(checked(l), what); });
      },
      layers, py::arg("what"));
  m.def(
      "_rules_starts_disabled", [](const LayerTables& l) { return rules::starts_disabled(checked(l)); }, layers);
  m.def(
      "_rules_check_new_adapter",
      [](const LayerTables& l, const std::string& name, const std::string& hint) {
        translating([&] { rules::check_new_adapter(checked(l), name, hint); });
      },
      layers, py::arg("name"), py::arg("hint"));
  m.def(
      "_rules_trained_biases",
      [](const LayerTables& l, const std::vector<std::string>& parameter_names, const std::string& adapter,
         const std::vector<std::string>& kept_whole) {
        return rules::trained_biases(checked(l), parameter_names, adapter, kept_whole);
      },
      layers, py::arg("parameter_names"), py::arg("adapter"), py::arg("kept_whole") = std::vector<std::string>{});
  using Shapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;
  m.def(
      "_rules_match_biases",
      [](const Shapes& file_biases, const Shapes& parameters, const std::string& what) {
        return translating([&] { return rules::match_biases(file_biases, parameters, what); });
      },
      py::arg("file_biases"), py::arg("parameters"), py::arg("what"));
}

}  // namespace

void bind_peft(py::module& m) {
  bind_rules(m);
  m.def(
      "_cpp_inject_lora",
      [](torch::nn::Module& module, const std::string& config, const std::string& adapter_name, bool autocast) {
        const auto report = warning_in_python(
            [&] { return lorafuse::inject_lora(module, config_from(config), adapter_name, autocast); });
        return py::make_tuple(report.targets, report.wrapped, report.trainable, report.total);
      },
      py::arg("module"), py::arg("config"), py::arg("adapter_name"), py::arg("autocast_adapter_dtype") = true);
  using torch::nn::Module;
  const auto arg = py::arg("module");
  m.def(
      "_cpp_set_adapter", [](Module& mod, const std::string& n) { translating([&] { set_adapter(mod, n); }); }, arg,
      py::arg("adapter_name"));
  m.def(
      "_cpp_delete_adapter", [](Module& mod, const std::string& n) { translating([&] { delete_adapter(mod, n); }); },
      arg, py::arg("adapter_name"));
  m.def(
      "_cpp_trainable_parameters",
      [](const Module& mod) {
        const auto count = trainable_parameters(mod);
        return std::make_pair(count.trainable, count.total);
      },
      arg);
  m.def(
      "_cpp_disable_adapters", [](Module& mod) { translating([&] { disable_adapters(mod); }); }, arg);
  m.def(
      "_cpp_enable_adapters", [](Module& mod) { translating([&] { enable_adapters(mod); }); }, arg);
  m.def(
      "_cpp_merge",
      [](Module& mod, const std::vector<std::string>& names, bool requantize) {
        std::map<std::string, std::pair<double, double>> report;
        for (const auto& [path, e] : warning_in_python([&] { return merge_adapter(mod, names, requantize); })) {
          report.emplace(path, std::make_pair(e.output_error, e.adapter_error));
        }
        return report;
      },
      arg, py::arg("adapter_names"), py::arg("requantize") = false,
      "merge_adapter: {path: (output_error, adapter_error)} of the layers re-quantized.");
  m.def(
      "_cpp_unmerge", [](Module& mod) { translating([&] { unmerge_adapter(mod); }); }, arg);
  m.def(
      "_cpp_merge_and_unload", [](Module& mod) { translating([&] { merge_and_unload(mod); }); }, arg);
  m.def(
      "_cpp_unload", [](Module& mod) { return translating([&] { return unload(mod); }); }, arg,
      "lorafuse::unload: every LoRA layer's base back in its place, adapters dropped; the paths unloaded.");
  m.def(
      "_cpp_adapter_names", [](Module& mod) { return adapter_names(mod); }, arg);
  m.def(
      "_cpp_active_adapter", [](Module& mod) { return active_adapter(mod); }, arg);
  m.def(
      "_cpp_lora_layers",
      [](Module& mod) {
        std::vector<std::string> paths;
        for (const auto& [path, layer] : lora_layers(mod)) paths.push_back(path);
        return paths;
      },
      arg);
  m.def(
      "_cpp_saved_modules",
      [](Module& mod) {
        std::vector<std::string> paths;
        for (const auto& [path, wrapper] : saved_modules(mod)) paths.push_back(path);
        return paths;
      },
      arg);
  m.def(
      "_cpp_save_adapter",
      [](torch::nn::Module& module, const std::string& dir, const std::string& adapter_name) {
        translating([&] { lorafuse::save_adapter(module, dir, adapter_name); });
      },
      py::arg("module"), py::arg("dir"), py::arg("adapter_name"));
  m.def(
      "_cpp_load_adapter",
      [](torch::nn::Module& module, const std::string& dir, const std::string& adapter_name, bool partial,
         bool is_trainable, bool autocast_adapter_dtype) {
        // Read and warn first: a warning turned into an error must leave the model unchanged.
        const auto file = translating([&] {
          nn::check_adapter_name(adapter_name);
          return io::read_adapter(dir);
        });
        for (const auto& w : file.warnings) {
          if (PyErr_WarnEx(PyExc_UserWarning, valid_utf8(w).c_str(), 1) != 0) throw py::error_already_set();
        }
        const auto report = translating([&] {
          return lorafuse::load_adapter(module, file, adapter_name,
                                        lorafuse::LoadAdapterOptions()
                                            .partial(partial)
                                            .is_trainable(is_trainable)
                                            .autocast_adapter_dtype(autocast_adapter_dtype));
        });
        return py::make_tuple(report.targets, report.wrapped, report.trainable, report.total);
      },
      py::arg("module"), py::arg("dir"), py::arg("adapter_name"), py::arg("partial"), py::arg("is_trainable"),
      py::arg("autocast_adapter_dtype"));
}

}  // namespace lorafuse::python
