// PYBIND11_MODULE(_C): loading this module loads liblorafuse, which registers torch.ops.lorafuse.*.
// It also gives the Python front the C++ implementation of LoraConfig's rules (validation and target
// selection), so that C++ and Python select the same layers.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <lorafuse/config.h>
#include <lorafuse/ops.h>

#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// c10's ValueError / TypeError as Python's, with the message and without the C++ backtrace.
template <class F>
auto translating(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::TypeError& e) {
    throw py::type_error(e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.what_without_backtrace());
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

lorafuse::TargetModules target_modules_from(const py::handle& value, const char* field, bool none_is_default) {
  if (value.is_none()) {
    return none_is_default ? lorafuse::TargetModules({"q_proj", "v_proj"}) : lorafuse::TargetModules();
  }
  if (py::isinstance<py::str>(value)) return lorafuse::TargetModules(value.cast<std::string>());
  if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value) || py::isinstance<py::set>(value)) {
    std::vector<std::string> names;
    for (const auto& item : value) {
      if (!py::isinstance<py::str>(item)) {
        throw py::type_error(std::string(field) + ": expected module names (str), found " +
                             std::string(py::str(py::type::of(item).attr("__name__"))));
      }
      names.push_back(item.cast<std::string>());
    }
    return lorafuse::TargetModules(std::move(names));
  }
  throw py::type_error(std::string(field) + ": expected a list of module names, a regular expression (str) or "
                       "\"all-linear\", found " + std::string(py::str(py::type::of(value).attr("__name__"))));
}

template <typename T>
lorafuse::PatternMap<T> patterns_from(const py::handle& value, const char* field) {
  lorafuse::PatternMap<T> out;
  if (value.is_none()) return out;
  if (!py::isinstance<py::dict>(value)) {
    throw py::type_error(std::string(field) + ": expected a dict {pattern: value}, found " +
                         std::string(py::str(py::type::of(value).attr("__name__"))));
  }
  for (const auto& item : value.template cast<py::dict>()) {
    out.emplace_back(item.first.template cast<std::string>(), item.second.template cast<T>());
  }
  return out;
}

// The fields of lorafuse.LoraConfig (a dict from dataclasses.asdict) as the C++ LoraConfig.
lorafuse::LoraConfig config_from(const py::dict& d) {
  lorafuse::LoraConfig c;
  c.r(d["r"].cast<int64_t>())
      .lora_alpha(d["lora_alpha"].cast<double>())
      .lora_dropout(d["lora_dropout"].cast<double>())
      .target_modules(target_modules_from(d["target_modules"], "target_modules", true))
      .exclude_modules(target_modules_from(d["exclude_modules"], "exclude_modules", false))
      .bias(d["bias"].cast<std::string>())
      .use_rslora(d["use_rslora"].cast<bool>())
      .rank_pattern(patterns_from<int64_t>(d["rank_pattern"], "rank_pattern"))
      .alpha_pattern(patterns_from<double>(d["alpha_pattern"], "alpha_pattern"));
  const py::handle init = d["init_lora_weights"];
  if (py::isinstance<py::bool_>(init)) {
    c.init_lora_weights(lorafuse::nn::InitLoraWeights(init.cast<bool>()));
  } else if (py::isinstance<py::str>(init)) {
    c.init_lora_weights(lorafuse::nn::InitLoraWeights(init.cast<std::string>()));
  } else {
    throw py::type_error("init_lora_weights: expected True, False or \"gaussian\", found " +
                         std::string(py::str(py::type::of(init).attr("__name__"))));
  }
  return c;
}

py::dict adapter_dict(const lorafuse::nn::LoraAdapterOptions& a) {
  py::dict out;
  out["r"] = a.r();
  out["lora_alpha"] = a.lora_alpha();
  out["lora_dropout"] = a.lora_dropout();
  out["use_rslora"] = a.use_rslora();
  out["init_lora_weights"] = a.init_lora_weights().str();
  out["bias"] = a.bias();
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorafuse native module. Importing it registers the torch.ops.lorafuse operators.";
  m.attr("__version__") = LORAFUSE_VERSION;
  m.def("has_cuda_kernels", &lorafuse::has_cuda_kernels,
        "Whether this build of lorafuse has its CUDA kernels (LORAFUSE_CUDA at build time).");
  m.def(
      "_validate_lora_config", [](const py::dict& config) { translating([&] { config_from(config).validate(); }); },
      "Raises ValueError / TypeError unless the lorafuse.LoraConfig fields (a dict) are valid.");
  m.def(
      "_validate_adapter",
      [](const std::string& name, int64_t r, double lora_alpha, double lora_dropout) {
        translating([&] {
          lorafuse::nn::check_adapter_name(name);
          lorafuse::nn::LoraAdapterOptions(r).lora_alpha(lora_alpha).lora_dropout(lora_dropout).validate();
        });
      },
      py::arg("name"), py::arg("r"), py::arg("lora_alpha"), py::arg("lora_dropout"),
      "Raises ValueError unless an adapter with this name and these options can be made (the C++ rules).");
  m.def(
      "_select_targets",
      [](const std::vector<std::tuple<std::string, std::string, bool>>& modules, const py::dict& config) {
        std::vector<lorafuse::ModuleInfo> infos;
        infos.reserve(modules.size());
        for (const auto& [path, type_name, is_linear] : modules) infos.push_back({path, type_name, is_linear});
        const auto chosen = translating([&] { return lorafuse::select_targets(infos, config_from(config)); });
        py::list out;
        for (const auto& c : chosen) out.append(py::make_tuple(c.index, adapter_dict(c.adapter)));
        return out;
      },
      "The (index, adapter options) of the modules (path, type name, is_linear) that a config selects: the "
      "selection rules of C++ inject_lora.");
}
