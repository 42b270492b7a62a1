// PYBIND11_MODULE(_C): loading this module loads liblorafuse, which registers torch.ops.lorafuse.*.
// It also gives the Python front the C++ implementation of LoraConfig's rules (validation and target
// selection), so that C++ and Python select the same layers.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <lorafuse/peft/adapters.h>
#include <lorafuse/config/lora_config.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/io/adapter.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/ops.h>
#include <torch/python.h>

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// A message that Python can decode: bytes that are not UTF-8 (quoted from a corrupted file) as \xNN.
std::string valid_utf8(const std::string& s) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool ok = n > 0 && i + n <= s.size();
    for (size_t k = 1; ok && k < n; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xc0) == 0x80;
    if (ok) {
      out.append(s, i, n);
      i += n;
    } else {
      char esc[5];
      std::snprintf(esc, sizeof(esc), "\\x%02x", c);
      out += esc;
      ++i;
    }
  }
  return out;
}

// c10's ValueError / TypeError as Python's, with the message and without the C++ backtrace.
template <class F>
auto translating(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::TypeError& e) {
    throw py::type_error(valid_utf8(e.what_without_backtrace()));
  } catch (const c10::ValueError& e) {
    throw py::value_error(valid_utf8(e.what_without_backtrace()));
  } catch (const c10::Error& e) {
    throw std::runtime_error(valid_utf8(e.what_without_backtrace()));
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
  throw py::type_error(std::string(field) +
                       ": expected a list of module names, a regular expression (str) or "
                       "\"all-linear\", found " +
                       std::string(py::str(py::type::of(value).attr("__name__"))));
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

lorafuse::nn::InitLoraWeights init_from(const py::handle& init) {
  if (py::isinstance<py::bool_>(init)) return lorafuse::nn::InitLoraWeights(init.cast<bool>());
  if (py::isinstance<py::str>(init)) return lorafuse::nn::InitLoraWeights(init.cast<std::string>());
  throw py::type_error("init_lora_weights: expected True, False or \"gaussian\", found " +
                       std::string(py::str(py::type::of(init).attr("__name__"))));
}

std::vector<lorafuse::ModuleInfo> infos_from(
    const std::vector<std::tuple<std::string, std::string, bool, int64_t, int64_t>>& modules) {
  std::vector<lorafuse::ModuleInfo> infos;
  infos.reserve(modules.size());
  for (const auto& [path, type_name, is_linear, in, out] : modules)
    infos.push_back({path, type_name, is_linear, in, out});
  return infos;
}

py::dict config_dict(const lorafuse::LoraConfig& c, bool targets_from_file) {
  py::dict d;
  d["r"] = c.r();
  d["lora_alpha"] = c.lora_alpha();
  d["lora_dropout"] = c.lora_dropout();
  const auto& t = c.target_modules();
  d["target_modules"] = targets_from_file                     ? py::object(py::none())
                        : (t.is_regex() || t.is_all_linear()) ? py::object(py::str(t.regex()))
                                                              : py::object(py::cast(t.names()));
  const auto& e = c.exclude_modules();
  d["exclude_modules"] = e.empty()                             ? py::object(py::none())
                         : (e.is_regex() || e.is_all_linear()) ? py::object(py::str(e.regex()))
                                                               : py::object(py::cast(e.names()));
  d["bias"] = c.bias();
  d["use_rslora"] = c.use_rslora();
  py::dict ranks, alphas;
  for (const auto& [k, v] : c.rank_pattern()) ranks[py::str(k)] = v;
  for (const auto& [k, v] : c.alpha_pattern()) alphas[py::str(k)] = v;
  d["rank_pattern"] = ranks;
  d["alpha_pattern"] = alphas;
  const auto init = c.init_lora_weights().str();
  d["init_lora_weights"] = init == "gaussian" ? py::object(py::str(init)) : py::object(py::bool_(init == "true"));
  return d;
}

py::dict adapter_file_dict(const lorafuse::io::AdapterFile& file) {
  py::dict out;
  out["config"] = config_dict(file.config, file.targets_from_file);
  out["config_json"] = lorafuse::io::adapter_config_json(file);
  py::list layers;
  for (const auto& l : file.layers) layers.append(py::make_tuple(l.path, l.lora_A, l.lora_B));
  out["layers"] = layers;
  out["biases"] = file.biases;
  out["warnings"] = file.warnings;
  return out;
}

lorafuse::nn::LoraAdapterOptions adapter_from(const py::dict& d);

// The C++ modules: lorafuse.nn.LoraLinear and lorafuse.models.Llama (torch.nn.Module wrappers made by
// torch::python::bind_module), keyword names as the C++ Options fields.
void bind_modules(py::module& m) {
  using lorafuse::nn::LoraAdapterOptions;
  using lorafuse::nn::LoraLinearImpl;
  using lorafuse::nn::LoraLinearOptions;
  torch::python::bind_module<LoraLinearImpl>(m, "LoraLinear")
      .def(py::init([](int64_t in_features, int64_t out_features, bool bias, const std::string& adapter_name, int64_t r,
                       double lora_alpha, double lora_dropout, bool use_rslora, const py::object& init_lora_weights,
                       std::optional<at::ScalarType> adapter_dtype) {
             return translating([&] {
               return std::make_shared<LoraLinearImpl>(LoraLinearOptions(in_features, out_features)
                                                           .bias(bias)
                                                           .adapter_name(adapter_name)
                                                           .r(r)
                                                           .lora_alpha(lora_alpha)
                                                           .lora_dropout(lora_dropout)
                                                           .use_rslora(use_rslora)
                                                           .init_lora_weights(init_from(init_lora_weights))
                                                           .adapter_dtype(adapter_dtype));
             });
           }),
           py::arg("in_features"), py::arg("out_features"), py::arg("bias") = true, py::arg("adapter_name") = "default",
           py::arg("r") = 8, py::arg("lora_alpha") = 8.0, py::arg("lora_dropout") = 0.0, py::arg("use_rslora") = false,
           py::arg("init_lora_weights") = true, py::arg("adapter_dtype") = py::none())
      .def(
          "add_adapter",
          [](LoraLinearImpl& self, const std::string& name, int64_t r, double lora_alpha, double lora_dropout,
             bool use_rslora, const py::object& init_lora_weights, std::optional<at::ScalarType> dtype) {
            translating([&] {
              self.add_adapter(name, LoraAdapterOptions(r)
                                         .lora_alpha(lora_alpha)
                                         .lora_dropout(lora_dropout)
                                         .use_rslora(use_rslora)
                                         .init_lora_weights(init_from(init_lora_weights))
                                         .dtype(dtype));
            });
          },
          py::arg("adapter_name"), py::arg("r") = 8, py::arg("lora_alpha") = 8.0, py::arg("lora_dropout") = 0.0,
          py::arg("use_rslora") = false, py::arg("init_lora_weights") = true, py::arg("dtype") = py::none())
      .def("set_adapter", [](LoraLinearImpl& self, const std::string& n) { translating([&] { self.set_adapter(n); }); })
      .def("delete_adapter",
           [](LoraLinearImpl& self, const std::string& n) { translating([&] { self.delete_adapter(n); }); })
      .def("disable_adapters", &LoraLinearImpl::disable_adapters)
      .def("enable_adapters", &LoraLinearImpl::enable_adapters)
      .def(
          "merge",
          [](LoraLinearImpl& self, const std::vector<std::string>& names) { translating([&] { self.merge(names); }); },
          py::arg("adapter_names") = std::vector<std::string>{})
      .def("unmerge", [](LoraLinearImpl& self) { translating([&] { self.unmerge(); }); })
      .def("merged", &LoraLinearImpl::merged)
      .def("merged_adapters", &LoraLinearImpl::merged_adapters)
      .def("active_adapter", &LoraLinearImpl::active_adapter)
      .def("adapter_names", &LoraLinearImpl::adapter_names)
      .def("lora_a",
           [](LoraLinearImpl& self, const std::string& n) { return translating([&] { return self.lora_a(n); }); })
      .def("lora_b",
           [](LoraLinearImpl& self, const std::string& n) { return translating([&] { return self.lora_b(n); }); })
      .def("delta_weight", [](LoraLinearImpl& self, const std::string& n) {
        return translating([&] { return self.delta_weight(n); });
      });

  using lorafuse::models::LlamaConfig;
  py::class_<LlamaConfig>(m, "LlamaConfig")
      .def(py::init([](int64_t vocab_size, int64_t hidden_size, int64_t intermediate_size, int64_t num_hidden_layers,
                       int64_t num_attention_heads, int64_t num_key_value_heads, int64_t max_position_embeddings,
                       double rope_theta, double rms_norm_eps, double initializer_range,
                       std::optional<at::ScalarType> dtype, std::optional<at::Device> device) {
             auto options = c10::TensorOptions().dtype(dtype.value_or(at::kFloat)).device(device.value_or(at::kCPU));
             LlamaConfig c;
             c.vocab_size(vocab_size)
                 .hidden_size(hidden_size)
                 .intermediate_size(intermediate_size)
                 .num_hidden_layers(num_hidden_layers)
                 .num_attention_heads(num_attention_heads)
                 .num_key_value_heads(num_key_value_heads)
                 .max_position_embeddings(max_position_embeddings)
                 .rope_theta(rope_theta)
                 .rms_norm_eps(rms_norm_eps)
                 .initializer_range(initializer_range)
                 .tensor_options(options);
             translating([&] { c.validate(); });
             return c;
           }),
           py::arg("vocab_size") = 128, py::arg("hidden_size") = 64, py::arg("intermediate_size") = 176,
           py::arg("num_hidden_layers") = 2, py::arg("num_attention_heads") = 4, py::arg("num_key_value_heads") = 2,
           py::arg("max_position_embeddings") = 2048, py::arg("rope_theta") = 10000.0, py::arg("rms_norm_eps") = 1e-6,
           py::arg("initializer_range") = 0.02, py::arg("dtype") = py::none(), py::arg("device") = py::none())
      .def_property_readonly("vocab_size", [](const LlamaConfig& c) { return c.vocab_size(); })
      .def_property_readonly("hidden_size", [](const LlamaConfig& c) { return c.hidden_size(); })
      .def_property_readonly("num_hidden_layers", [](const LlamaConfig& c) { return c.num_hidden_layers(); })
      .def("num_parameters", &LlamaConfig::num_parameters);
  torch::python::bind_module<lorafuse::models::LlamaForCausalLMImpl>(m, "Llama")
      .def(py::init([](const LlamaConfig& c) {
             return translating([&] { return std::make_shared<lorafuse::models::LlamaForCausalLMImpl>(c); });
           }),
           py::arg("config"));

  // Model-wide functions on C++ modules (what lorafuse.inject_lora & co. call for them).
  m.def(
      "_cpp_inject_lora",
      [](torch::nn::Module& module, const py::dict& config, const std::string& adapter_name) {
        const auto report =
            translating([&] { return lorafuse::inject_lora(module, config_from(config), adapter_name); });
        return py::make_tuple(report.targets, report.wrapped, report.trainable, report.total);
      },
      py::arg("module"), py::arg("config"), py::arg("adapter_name"));
  m.def(
      "_cpp_adapters",
      [](torch::nn::Module& module, const std::string& op, const std::vector<std::string>& names) -> py::object {
        return translating([&]() -> py::object {
          if (op == "set_adapter")
            lorafuse::set_adapter(module, names.at(0));
          else if (op == "delete_adapter")
            lorafuse::delete_adapter(module, names.at(0));
          else if (op == "disable_adapters")
            lorafuse::disable_adapters(module);
          else if (op == "enable_adapters")
            lorafuse::enable_adapters(module);
          else if (op == "merge")
            lorafuse::merge_adapter(module, names);
          else if (op == "unmerge")
            lorafuse::unmerge_adapter(module);
          else if (op == "merge_and_unload")
            lorafuse::merge_and_unload(module);
          else if (op == "adapter_names")
            return py::cast(lorafuse::adapter_names(module));
          else if (op == "active_adapter")
            return py::cast(lorafuse::active_adapter(module));
          else if (op == "lora_layers") {
            py::list out;
            for (const auto& [path, layer] : lorafuse::lora_layers(module)) out.append(path);
            return out;
          } else
            TORCH_CHECK_VALUE(false, "unknown operation ", op);
          return py::none();
        });
      },
      py::arg("module"), py::arg("op"), py::arg("names") = std::vector<std::string>{});
  m.def(
      "_cpp_save_adapter",
      [](torch::nn::Module& module, const std::string& dir, const std::string& adapter_name) {
        translating([&] { lorafuse::save_adapter(module, dir, adapter_name); });
      },
      py::arg("module"), py::arg("dir"), py::arg("adapter_name"));
  m.def(
      "_cpp_load_adapter",
      [](torch::nn::Module& module, const std::string& dir, const std::string& adapter_name, bool partial) {
        // Read and warn first: a warning turned into an error must leave the model unchanged.
        const auto file = translating([&] {
          lorafuse::nn::check_adapter_name(adapter_name);
          return lorafuse::io::read_adapter(dir);
        });
        for (const auto& w : file.warnings) {
          if (PyErr_WarnEx(PyExc_UserWarning, valid_utf8(w).c_str(), 1) != 0) throw py::error_already_set();
        }
        const auto report = translating([&] {
          return lorafuse::load_adapter(module, file, adapter_name, lorafuse::LoadAdapterOptions().partial(partial));
        });
        return py::make_tuple(report.targets, report.wrapped, report.trainable, report.total);
      },
      py::arg("module"), py::arg("dir"), py::arg("adapter_name"), py::arg("partial"));
}

lorafuse::nn::LoraAdapterOptions adapter_from(const py::dict& d) {
  return lorafuse::nn::LoraAdapterOptions(d["r"].cast<int64_t>())
      .lora_alpha(d["lora_alpha"].cast<double>())
      .lora_dropout(d["lora_dropout"].cast<double>())
      .use_rslora(d["use_rslora"].cast<bool>())
      .init_lora_weights(init_from(d["init_lora_weights"]))
      .bias(d["bias"].cast<std::string>());
}

// The adapter-file functions the Python front uses for models written in Python.
void bind_adapter_files(py::module& m) {
  using Modules = std::vector<std::tuple<std::string, std::string, bool, int64_t, int64_t>>;
  m.def(
      "_read_adapter",
      [](const std::string& dir) {
        return adapter_file_dict(translating([&] { return lorafuse::io::read_adapter(dir); }));
      },
      py::arg("dir"),
      "The adapter in a folder, validated: {config, config_json, layers [(path, A, B)], biases, warnings}.");
  m.def(
      "_plan_adapter_load",
      [](const std::string& dir, const Modules& modules, bool partial) {
        const auto file = translating([&] { return lorafuse::io::read_adapter(dir); });
        const auto plan =
            translating([&] { return lorafuse::io::plan_adapter_load(file, infos_from(modules), partial); });
        py::dict out = adapter_file_dict(file);
        py::list targets;
        for (const auto& t : plan) targets.append(py::make_tuple(t.index, adapter_dict(t.adapter), t.lora_A, t.lora_B));
        out["targets"] = targets;
        return out;
      },
      py::arg("dir"), py::arg("modules"), py::arg("partial"),
      "Reads the adapter in `dir` and matches it against modules (path, type, is_linear, in, out): the "
      "(index, adapter options, A, B) to load, every loading rule checked.");
  m.def(
      "_save_adapter",
      [](const std::string& dir, const Modules& modules,
         const std::vector<std::tuple<size_t, py::dict, at::Tensor, at::Tensor>>& layers,
         const std::vector<std::pair<std::string, at::Tensor>>& biases, const std::string& base_model_name_or_path) {
        std::vector<lorafuse::io::SaveSource> sources;
        for (const auto& [index, opts, a, b] : layers) sources.push_back({index, adapter_from(opts), a, b});
        translating([&] {
          auto file = lorafuse::io::describe_adapter(infos_from(modules), sources, biases);
          file.base_model_name_or_path = base_model_name_or_path;
          lorafuse::io::write_adapter(dir, file);
        });
      },
      py::arg("dir"), py::arg("modules"), py::arg("layers"), py::arg("biases"), py::arg("base_model_name_or_path"),
      "Writes an adapter folder (PEFT's format, atomically) for these layers (index, options, A, B) of modules.");

  struct Scope {
    std::string name;
    std::unique_ptr<lorafuse::AdapterScope> scope;
  };
  py::class_<Scope>(m, "_AdapterScope")
      .def(py::init([](const std::string& name) {
        translating([&] {
          if (!name.empty()) lorafuse::nn::check_adapter_name(name);
        });
        return Scope{name, nullptr};
      }))
      .def("__enter__", [](Scope& s) { s.scope = std::make_unique<lorafuse::AdapterScope>(s.name); })
      .def("__exit__", [](Scope& s, const py::args&) { s.scope.reset(); });
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
  bind_modules(m);
  bind_adapter_files(m);
  m.def(
      "_read_safetensors",
      [](const std::string& path) {
        auto file = translating([&] { return lorafuse::io::read_safetensors(path); });
        return py::make_tuple(file.tensors, file.metadata);
      },
      py::arg("path"), "([(name, tensor)] in file order, metadata) of a safetensors file, every rule checked.");
  m.def(
      "_write_safetensors",
      [](const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
         const std::map<std::string, std::string>& metadata) {
        translating([&] { lorafuse::io::write_safetensors(path, tensors, metadata); });
      },
      py::arg("path"), py::arg("tensors"), py::arg("metadata") = std::map<std::string, std::string>{},
      "Writes a safetensors file atomically (temporary file, flush, rename).");
}
