// What the bindings share: C++ exceptions as Python's, and conversions between Python values and lorafuse's
// C++ types (config fields, adapter options, module lists, adapter files).
#pragma once

#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <lorafuse/config/lora_config.h>
#include <lorafuse/io/adapter.h>

#include <string>
#include <tuple>
#include <vector>

namespace lorafuse::python {

namespace py = pybind11;

// A message that Python can decode: bytes that are not UTF-8 (quoted from a corrupted file) as \xNN.
std::string valid_utf8(const std::string& s);

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

// Issues each TORCH_WARN of this thread as a Python UserWarning at once, so that a warning filter turning it into an
// error raises there: lorafuse's C++ warns while it checks, before it changes anything.
class PythonWarnings : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override;
};

// translating(f), with f's TORCH_WARN messages issued as Python UserWarnings as they come (see PythonWarnings).
template <class F>
auto warning_in_python(F&& f) -> decltype(f()) {
  PythonWarnings handler;
  c10::WarningUtils::WarningHandlerGuard guard(&handler);
  return translating(f);
}

// (path, type name, is_linear, in_features, out_features, is_embedding, is_lora_layer, is_saved_module, is_attention)
// per module, as the Python front lists them (ModuleInfo's fields).
using ModuleTuples = std::vector<std::tuple<std::string, std::string, bool, int64_t, int64_t, bool, bool, bool, bool>>;

// lorafuse.LoraConfig's fields as JSON (LoraConfig._to_json) → LoraConfig, through the one PEFT-JSON mapping.
LoraConfig config_from(const std::string& json_text);
nn::InitLoraWeights init_from(const py::handle& init);
std::vector<ModuleInfo> infos_from(const ModuleTuples& modules);
// {config_json, targets_from_file, layers, biases, warnings}: lorafuse.read_adapter builds "config" from config_json.
py::dict adapter_file_dict(const io::AdapterFile& file);
// [(module path, [(key, tensor)])] ⇔ io::SavedModule (modules_to_save)
using SavedTuples = std::vector<std::pair<std::string, std::vector<std::pair<std::string, at::Tensor>>>>;

// One binding function per area (csrc/python/bind_<area>.cpp), called by PYBIND11_MODULE in module.cpp.
void bind_config(py::module& m);
void bind_nn(py::module& m);
void bind_peft(py::module& m);
void bind_io(py::module& m);
void bind_models(py::module& m);
void bind_quant(py::module& m);

}  // namespace lorafuse::python
