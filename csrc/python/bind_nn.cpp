// lorafuse.nn: the C++ LoraLinear (torch::python::bind_module, keyword names as LoraLinearOptions) and the per-thread
// adapter scope.
#include "csrc/python/convert.h"

#include "csrc/config/adapter_json.h"

#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/adapter_table.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/nn/row_adapters.h>

#include <map>
#include <memory>
#include <sstream>

namespace lorafuse::python {

namespace {

// One adapter's options (C++ LoraAdapterOptions) and a layer's adapter table: what lorafuse.nn.Linear keeps and
// asks, so that its rules are the C++ layer's.
void bind_adapter_table(py::module& m) {
  using nn::AdapterTable;
  using nn::LoraAdapterOptions;
  py::class_<LoraAdapterOptions>(m, "AdapterOptions")
      .def(py::init([](int64_t r, double lora_alpha, double lora_dropout, bool use_rslora,
                       const py::object& init_lora_weights, const std::string& bias,
                       std::optional<at::ScalarType> dtype, const std::optional<std::string>& task_type,
                       const std::optional<std::map<std::string, int64_t>>& loftq_config, bool use_dora) {
             return translating([&] {
               LoraAdapterOptions o(r);
               o.use_dora(use_dora);
               o.lora_alpha(lora_alpha)
                   .lora_dropout(lora_dropout)
                   .use_rslora(use_rslora)
                   .init_lora_weights(init_from(init_lora_weights))
                   .bias(bias)
                   .dtype(dtype)
                   .task_type(task_type.value_or(""));
               if (loftq_config.has_value()) {
                 nlohmann::ordered_json fields = nlohmann::ordered_json::object();
                 for (const auto& [key, value] : *loftq_config) fields[key] = value;
                 o.loftq_config(detail::loftq_config_from_json(fields, "AdapterOptions"));
               }
               o.validate();
               return o;
             });
           }),
           py::arg("r") = 8, py::arg("lora_alpha") = 8.0, py::arg("lora_dropout") = 0.0, py::arg("use_rslora") = false,
           py::arg("init_lora_weights") = true, py::arg("bias") = "none", py::arg("dtype") = py::none(),
           py::arg("task_type") = py::none(), py::arg("loftq_config") = py::none(), py::arg("use_dora") = false)
      .def_property_readonly("r", [](const LoraAdapterOptions& o) { return o.r(); })
      .def_property_readonly("lora_alpha", [](const LoraAdapterOptions& o) { return o.lora_alpha(); })
      .def_property_readonly("lora_dropout", [](const LoraAdapterOptions& o) { return o.lora_dropout(); })
      .def_property_readonly("use_rslora", [](const LoraAdapterOptions& o) { return o.use_rslora(); })
      .def_property_readonly("use_dora", [](const LoraAdapterOptions& o) { return o.use_dora(); })
      .def_property_readonly("init_lora_weights",
                             [](const LoraAdapterOptions& o) -> py::object {
                               const auto init = detail::init_lora_weights_json(o.init_lora_weights());
                               if (init.is_string()) return py::str(init.get<std::string>());
                               return py::bool_(init.get<bool>());
                             })
      .def_property_readonly("loftq_config",
                             [](const LoraAdapterOptions& o) {
                               return std::map<std::string, int64_t>{{"loftq_bits", o.loftq_config().loftq_bits()},
                                                                     {"loftq_iter", o.loftq_config().loftq_iter()}};
                             })
      .def_property_readonly("bias", [](const LoraAdapterOptions& o) { return o.bias(); })
      .def_property_readonly("task_type",
                             [](const LoraAdapterOptions& o) -> std::optional<std::string> {
                               if (o.task_type().empty()) return std::nullopt;
                               return o.task_type();
                             })
      .def_property_readonly("dtype", [](const LoraAdapterOptions& o) { return o.dtype(); })
      .def_property_readonly("scale", &LoraAdapterOptions::scale)
      .def(
          "__eq__",
          [](const LoraAdapterOptions& a, const LoraAdapterOptions& b) {
            return nn::adapter_options_json(a) == nn::adapter_options_json(b);
          },
          py::is_operator())  // another type: NotImplemented, so == is False and `in` works
      .def("__hash__", [](const LoraAdapterOptions& o) { return py::hash(py::str(nn::adapter_options_json(o))); })
      .def("__repr__",
           [](const LoraAdapterOptions& o) { return "AdapterOptions(" + nn::adapter_options_json(o) + ")"; })
      .def(py::pickle([](const LoraAdapterOptions& o) { return nn::adapter_options_json(o); },
                      [](const std::string& text) {
                        return translating([&] { return nn::adapter_options_from_json(text, "AdapterOptions"); });
                      }));

  py::class_<AdapterTable>(m, "AdapterTable")
      .def(py::init<>())
      .def_property_readonly("names", &AdapterTable::names)
      .def("has", &AdapterTable::has)
      .def(
          "options",
          [](const AdapterTable& t, const std::string& name, const std::string& what) {
            return translating([&] { return t.options(name, what.c_str()); });
          },
          py::arg("name"), py::arg("what") = "adapter_options")
      .def_property_readonly("active", &AdapterTable::active)
      .def_property_readonly("enabled", &AdapterTable::enabled)
      .def_property_readonly("merged", &AdapterTable::merged)
      .def("is_merged", &AdapterTable::is_merged)
      .def("trains", &AdapterTable::trains)
      .def("check_add",
           [](const AdapterTable& t, const std::string& name, const LoraAdapterOptions& o, at::ScalarType base_dtype) {
             return translating([&] { return t.check_add(name, o, base_dtype); });
           })
      .def("add", [](AdapterTable& t, const std::string& name, const LoraAdapterOptions& o,
                     bool activate) { return translating([&] { return t.add(name, o, activate); }); })
      .def("check_remove", [](const AdapterTable& t, const std::string& n) { translating([&] { t.check_remove(n); }); })
      .def("remove", [](AdapterTable& t, const std::string& n) { return translating([&] { return t.remove(n); }); })
      .def("check_activate",
           [](const AdapterTable& t, const std::string& n) { return translating([&] { return t.check_activate(n); }); })
      .def("activate", [](AdapterTable& t, const std::string& n) { translating([&] { t.activate(n); }); })
      .def("check_clear", &AdapterTable::check_clear)
      .def("clear_active", &AdapterTable::clear_active)
      .def("set_enabled", &AdapterTable::set_enabled)
      .def(
          "route",
          [](const AdapterTable& t, const std::optional<std::string>& scoped) {
            return translating([&] { return t.route(scoped); });
          },
          py::arg("scoped"))
      .def("plan_merge",
           [](const AdapterTable& t, const std::vector<std::string>& names) {
             return warning_in_python([&] { return t.plan_merge(names); });
           })
      .def("set_merged", &AdapterTable::set_merged)
      .def("check_unmerge", [](const AdapterTable& t) { translating([&] { t.check_unmerge(); }); })
      .def("plan_unload", &AdapterTable::plan_unload)
      .def("unloaded_adapters", &AdapterTable::unloaded_adapters)
      .def("describe", &AdapterTable::describe)
      .def("to_json", &AdapterTable::to_json)
      .def_static("from_json",
                  [](const std::string& text, const std::string& what) {
                    return translating([&] { return AdapterTable::from_json(text, what); });
                  })
      .def(py::pickle([](const AdapterTable& t) { return t.to_json(); },
                      [](const std::string& text) {
                        return translating([&] { return AdapterTable::from_json(text, "AdapterTable"); });
                      }));
  m.def(
      "_init_changes_base",
      [](const py::object& init) { return translating([&] { return init_from(init).changes_base(); }); },
      py::arg("init_lora_weights"),
      "nn::InitLoraWeights::changes_base: whether init_lora_weights starts from the dense base weight and changes it "
      "(LoftQ, PiSSA, OLoRA).");
  m.def(
      "init_adapter_weights",
      [](at::Tensor a, at::Tensor b, const LoraAdapterOptions& o, bool embedding) {
        nn::init_adapter_weights(a, b, o, embedding);
      },
      py::arg("lora_A"), py::arg("lora_B"), py::arg("options"), py::arg("embedding") = false,
      "Sets a new adapter's A [r, in] and B [out, r] in place as options.init_lora_weights says (PEFT's rules; "
      "embedding: an embedding layer's, which PEFT starts the other way round).");
  m.def(
      "init_adapter_weights_from_base",
      [](at::Tensor weight, at::Tensor a, at::Tensor b, const LoraAdapterOptions& o) {
        translating([&] { nn::init_adapter_weights_from_base(weight, a, b, o); });
      },
      py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("options"),
      "LoftQ, PiSSA or OLoRA: A and B set from the dense base weight, which is changed in place "
      "(lorafuse::nn::init_adapter_weights_from_base).");
  m.def(
      "_check_loftq_weight",
      [](const std::string& path, const at::Tensor& weight, int64_t r, const nn::AdapterTable* table,
         const std::string& init) { translating([&] { nn::check_loftq_weight(path, weight, r, table, init); }); },
      py::arg("path"), py::arg("weight"), py::arg("r"), py::arg("table") = nullptr, py::arg("init") = "loftq",
      "lorafuse::nn::check_loftq_weight.");
}

}  // namespace

void bind_nn(py::module& m) {
  bind_adapter_table(m);
  using nn::LoraAdapterOptions;
  using nn::LoraLinearImpl;
  using nn::LoraLinearOptions;
  auto cls = torch::python::bind_module<LoraLinearImpl>(m, "LoraLinear");
  // pretty_print (the adapter table's description) instead of bind_module's bare module name; replaced, not
  // overloaded, so that it is the one Python calls.
  cls.attr("__repr__") = py::cpp_function(
      [](const LoraLinearImpl& self) {
        std::ostringstream out;
        self.pretty_print(out);
        return out.str();
      },
      py::name("__repr__"), py::is_method(cls));
  cls.def(py::init([](int64_t in_features, int64_t out_features, bool bias, const std::string& adapter_name, int64_t r,
                      double lora_alpha, double lora_dropout, bool use_rslora, const py::object& init_lora_weights,
                      std::optional<at::ScalarType> adapter_dtype) {
            return translating([&] {
              return std::make_shared<LoraLinearImpl>(LoraLinearOptions(in_features, out_features)
                                                          .bias(bias)
                                                          .adapter_name(adapter_name)
                                                          .adapter(LoraAdapterOptions(r)
                                                                       .lora_alpha(lora_alpha)
                                                                       .lora_dropout(lora_dropout)
                                                                       .use_rslora(use_rslora)
                                                                       .init_lora_weights(init_from(init_lora_weights))
                                                                       .dtype(adapter_dtype)));
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
          [](LoraLinearImpl& self, const std::vector<std::string>& names) {
            warning_in_python([&] { self.merge(names); });
          },
          py::arg("adapter_names") = std::vector<std::string>{})
      .def("unmerge", [](LoraLinearImpl& self) { translating([&] { self.unmerge(); }); })
      .def("merged", [](const LoraLinearImpl& self) { return self.merged(); })
      .def("merged_adapters", [](const LoraLinearImpl& self) { return self.merged_adapters(); })
      .def("active_adapter", [](const LoraLinearImpl& self) { return self.active_adapter(); })
      .def("adapter_names", [](const LoraLinearImpl& self) { return self.adapter_names(); })
      .def("lora_a",
           [](LoraLinearImpl& self, const std::string& n) { return translating([&] { return self.lora_a(n); }); })
      .def("lora_b",
           [](LoraLinearImpl& self, const std::string& n) { return translating([&] { return self.lora_b(n); }); })
      .def("delta_weight", [](LoraLinearImpl& self, const std::string& n) {
        return translating([&] { return self.delta_weight(n); });
      });

  // The per-row routing of a mixed batch: Python layers ask it for their plan, as C++ layers do.
  py::class_<nn::RowAdapters, std::shared_ptr<nn::RowAdapters>>(m, "RowAdapters")
      .def(py::init([](std::vector<std::string> names, const std::string& what) {
             return translating([&] { return std::make_shared<nn::RowAdapters>(std::move(names), what); });
           }),
           py::arg("names"), py::arg("what") = "use_adapter")
      .def_property_readonly("names", &nn::RowAdapters::names)
      .def(
          "plan",
          [](const nn::RowAdapters& self, const nn::AdapterTable& table, const std::vector<std::string>& available,
             const std::vector<int64_t>& x_sizes, const at::Device& device) {
            const auto plan = translating([&] { return self.plan(table, available, x_sizes, device); });
            return py::make_tuple(plan.adapters, plan.segments.order, plan.segments.offsets, plan.uniform);
          },
          py::arg("table"), py::arg("available"), py::arg("x_sizes"), py::arg("device"))
      .def(
          "dropout",
          [](const nn::RowAdapters& self, const std::vector<std::string>& adapters, const std::vector<double>& dropouts,
             bool training) { return translating([&] { return self.dropout(adapters, dropouts, training); }); },
          py::arg("adapters"), py::arg("dropouts"), py::arg("training"))
      .def(
          "row_groups",
          [](const nn::RowAdapters& self, int64_t rows, const std::vector<std::string>& available) {
            return translating([&] { return self.row_groups(rows, available); });
          },
          py::arg("rows"), py::arg("available"));

  struct Scope {
    std::string name;
    std::shared_ptr<nn::RowAdapters> rows;  // a mixed batch, else null
    std::unique_ptr<nn::AdapterScope> scope;
  };
  py::class_<Scope>(m, "_AdapterScope")
      .def(py::init([](const std::string& name) {
             translating([&] {
               if (!name.empty()) nn::check_adapter_name(name);
             });
             return Scope{name, nullptr, nullptr};
           }),
           py::arg("name"))
      .def(py::init([](std::shared_ptr<nn::RowAdapters> rows) {
             return Scope{"", std::move(rows), nullptr};
           }),
           py::arg("rows"))
      .def("__enter__",
           [](Scope& s) {
             s.scope = s.rows ? std::make_unique<nn::AdapterScope>(std::shared_ptr<const nn::RowAdapters>(s.rows))
                              : std::make_unique<nn::AdapterScope>(s.name);
           })
      .def("__exit__", [](Scope& s, const py::args&) { s.scope.reset(); });
  m.def(
      "_current_adapter_scope", [] { return nn::AdapterScope::current(); },
      "The innermost open adapter scope's name on this thread (\"\" runs the base), or None outside any scope.");
}

}  // namespace lorafuse::python
