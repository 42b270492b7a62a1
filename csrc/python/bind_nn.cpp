// lorafuse.nn: the C++ LoraLinear (torch::python::bind_module, keyword names as LoraLinearOptions) and the per-thread adapter scope.
#include "csrc/python/convert.h"

#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/lora_linear.h>

#include <memory>

namespace lorafuse::python {

void bind_nn(py::module& m) {
  using nn::LoraAdapterOptions;
  using nn::LoraLinearImpl;
  using nn::LoraLinearOptions;
  torch::python::bind_module<LoraLinearImpl>(m, "LoraLinear")
      .def(py::init([](int64_t in_features, int64_t out_features, bool bias, const std::string& adapter_name, int64_t r,
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


  struct Scope {
    std::string name;
    std::unique_ptr<nn::AdapterScope> scope;
  };
  py::class_<Scope>(m, "_AdapterScope")
      .def(py::init([](const std::string& name) {
        translating([&] {
          if (!name.empty()) nn::check_adapter_name(name);
        });
        return Scope{name, nullptr};
      }))
      .def("__enter__", [](Scope& s) { s.scope = std::make_unique<nn::AdapterScope>(s.name); })
      .def("__exit__", [](Scope& s, const py::args&) { s.scope.reset(); });
  m.def(
      "_current_adapter_scope", [] { return nn::AdapterScope::current(); },
      "The innermost open adapter scope's name on this thread (\"\" runs the base), or None outside any scope.");
}

}  // namespace lorafuse::python
