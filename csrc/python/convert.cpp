#include "csrc/python/convert.h"

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

namespace {

TargetModules target_modules_from(const py::handle& value, const char* field, bool none_is_default) {
  if (value.is_none()) {
    return none_is_default ? TargetModules({"q_proj", "v_proj"}) : TargetModules();
  }
  if (py::isinstance<py::str>(value)) return TargetModules(value.cast<std::string>());
  if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value) || py::isinstance<py::set>(value)) {
    std::vector<std::string> names;
    for (const auto& item : value) {
      if (!py::isinstance<py::str>(item)) {
        throw py::type_error(std::string(field) + ": expected module names (str), found " +
                             std::string(py::str(py::type::of(item).attr("__name__"))));
      }
      names.push_back(item.cast<std::string>());
    }
    return TargetModules(std::move(names));
  }
  throw py::type_error(std::string(field) +
                       ": expected a list of module names, a regular expression (str) or "
                       "\"all-linear\", found " +
                       std::string(py::str(py::type::of(value).attr("__name__"))));
}

template <typename T>
PatternMap<T> patterns_from(const py::handle& value, const char* field) {
  PatternMap<T> out;
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

}  // namespace

// The fields of lorafuse.LoraConfig (a dict from dataclasses.asdict) as the C++ LoraConfig.
LoraConfig config_from(const py::dict& d) {
  LoraConfig c;
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
    c.init_lora_weights(nn::InitLoraWeights(init.cast<bool>()));
  } else if (py::isinstance<py::str>(init)) {
    c.init_lora_weights(nn::InitLoraWeights(init.cast<std::string>()));
  } else {
    throw py::type_error("init_lora_weights: expected True, False or \"gaussian\", found " +
                         std::string(py::str(py::type::of(init).attr("__name__"))));
  }
  return c;
}

py::dict adapter_dict(const nn::LoraAdapterOptions& a) {
  py::dict out;
  out["r"] = a.r();
  out["lora_alpha"] = a.lora_alpha();
  out["lora_dropout"] = a.lora_dropout();
  out["use_rslora"] = a.use_rslora();
  out["init_lora_weights"] = a.init_lora_weights().str();
  out["bias"] = a.bias();
  return out;
}

nn::InitLoraWeights init_from(const py::handle& init) {
  if (py::isinstance<py::bool_>(init)) return nn::InitLoraWeights(init.cast<bool>());
  if (py::isinstance<py::str>(init)) return nn::InitLoraWeights(init.cast<std::string>());
  throw py::type_error("init_lora_weights: expected True, False or \"gaussian\", found " +
                       std::string(py::str(py::type::of(init).attr("__name__"))));
}

std::vector<ModuleInfo> infos_from(const ModuleTuples& modules) {
  std::vector<ModuleInfo> infos;
  infos.reserve(modules.size());
  for (const auto& [path, type_name, is_linear, in, out] : modules)
    infos.push_back({path, type_name, is_linear, in, out});
  return infos;
}

py::dict config_dict(const LoraConfig& c, bool targets_from_file) {
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

py::dict adapter_file_dict(const io::AdapterFile& file) {
  py::dict out;
  out["config"] = config_dict(file.config, file.targets_from_file);
  out["config_json"] = io::adapter_config_json(file);
  py::list layers;
  for (const auto& l : file.layers) layers.append(py::make_tuple(l.path, l.lora_A, l.lora_B));
  out["layers"] = layers;
  out["biases"] = file.biases;
  out["warnings"] = file.warnings;
  return out;
}

nn::LoraAdapterOptions adapter_from(const py::dict& d) {
  return nn::LoraAdapterOptions(d["r"].cast<int64_t>())
      .lora_alpha(d["lora_alpha"].cast<double>())
      .lora_dropout(d["lora_dropout"].cast<double>())
      .use_rslora(d["use_rslora"].cast<bool>())
      .init_lora_weights(init_from(d["init_lora_weights"]))
      .bias(d["bias"].cast<std::string>());
}

}  // namespace lorafuse::python
