#include "csrc/python/convert.h"

#include <lorafuse/config/peft_json.h>

#include <cstdio>
#include <utility>

namespace lorafuse::python {

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

void PythonWarnings::process(const c10::Warning& warning) {
  py::gil_scoped_acquire gil;  // the binding may have released it (lq_lora)
  if (PyErr_WarnEx(PyExc_UserWarning, valid_utf8(warning.msg()).c_str(), 1) != 0) throw py::error_already_set();
}

LoraConfig config_from(const std::string& json_text) {
  return lora_config_from_peft_json(json_text, "LoraConfig", /*adapter_file=*/false).config;
}

nn::InitLoraWeights init_from(const py::handle& init) {
  if (py::isinstance<py::bool_>(init)) return nn::InitLoraWeights(init.cast<bool>());
  if (py::isinstance<py::str>(init)) return nn::InitLoraWeights(init.cast<std::string>());
  throw py::type_error("init_lora_weights: expected True, False, \"gaussian\" or \"loftq\", found " +
                       std::string(py::str(py::type::of(init).attr("__name__"))));
}

std::vector<ModuleInfo> infos_from(const ModuleTuples& modules) {
  std::vector<ModuleInfo> infos;
  infos.reserve(modules.size());
  for (const auto& [path, type_name, is_linear, in, out, is_embedding, is_lora, is_saved, is_attention] : modules) {
    ModuleInfo info{path, type_name, is_linear, in, out};
    info.is_embedding = is_embedding;
    info.is_lora_layer = is_lora;
    info.is_saved_module = is_saved;
    info.is_attention = is_attention;
    infos.push_back(std::move(info));
  }
  return infos;
}

py::dict adapter_file_dict(const io::AdapterFile& file) {
  py::dict out;
  out["targets_from_file"] = file.targets_from_file;
  out["config_json"] = io::adapter_config_json(file);
  py::list layers;
  py::dict magnitudes;
  py::list embeddings;
  for (const auto& l : file.layers) {
    layers.append(py::make_tuple(l.path, l.lora_A, l.lora_B));
    if (l.magnitude.defined()) magnitudes[py::str(l.path)] = l.magnitude;
    if (l.embedding) embeddings.append(l.path);
  }
  out["layers"] = layers;
  out["magnitudes"] = magnitudes;
  out["embeddings"] = embeddings;
  out["base_weights"] = file.base_weights;
  out["biases"] = file.biases;
  py::list saved;
  for (const auto& m : file.saved_modules) saved.append(py::make_tuple(m.path, m.state));
  out["saved_modules"] = saved;
  out["warnings"] = file.warnings;
  return out;
}

}  // namespace lorafuse::python
