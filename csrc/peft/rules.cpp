#include <c10/util/Exception.h>
#include <lorafuse/peft/rules.h>

#include <algorithm>
#include <map>
#include <set>

namespace lorafuse::rules {
namespace {

using nn::AdapterTable;

bool listed(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

bool has_adapter(const LayerTables& layers, const std::string& name) {
  return std::any_of(layers.begin(), layers.end(), [&](const auto& l) { return l.second->has(name); });
}

}  // namespace

std::vector<std::string> adapter_names(const LayerTables& layers) {
  std::vector<std::string> names;
  for (const auto& [path, table] : layers) {
    for (const auto& n : table->names()) {
      if (!listed(names, n)) names.push_back(n);
    }
  }
  return names;
}

std::string active_adapter(const LayerTables& layers) {
  for (const auto& [path, table] : layers) {
    if (!table->active().empty()) return table->active();
  }
  return "";
}

void require_adapter(const LayerTables& layers, const std::string& name, const std::string& what) {
  TORCH_CHECK_VALUE(has_adapter(layers, name), what, ": no layer has an adapter named \"", name, "\"; the model has ",
                    AdapterTable::join(adapter_names(layers)));
}

void check_new_adapter(const LayerTables& layers, const std::string& name, const std::string& hint) {
  TORCH_CHECK_VALUE(!has_adapter(layers, name), "adapter_name: the model already has an adapter named \"", name,
                    "\"; adapters: ", AdapterTable::join(adapter_names(layers)), hint);
}

std::vector<std::string> plan_set_adapter(const LayerTables& layers, const std::string& name) {
  require_adapter(layers, name, "set_adapter");
  std::vector<std::string> plan;
  for (const auto& [path, table] : layers) plan.push_back(table->has(name) ? name : std::string());
  return plan;
}

std::optional<std::string> plan_delete_adapter(const LayerTables& layers, const std::string& name) {
  require_adapter(layers, name, "delete_adapter");
  for (const auto& [path, table] : layers) {
    TORCH_CHECK_VALUE(!table->is_merged(name), "delete_adapter: adapter \"", name, "\" is merged into \"", path,
                      "\"; unmerge first");
  }
  if (active_adapter(layers) != name) return std::nullopt;
  for (const auto& n : adapter_names(layers)) {
    if (n != name) return n;
  }
  return std::string();
}

std::vector<std::vector<std::string>> plan_merge(const LayerTables& layers, const std::vector<std::string>& names_in,
                                                 const std::string& what) {
  std::vector<std::string> names = names_in;
  if (names.empty()) {
    const auto active = active_adapter(layers);
    TORCH_CHECK_VALUE(!active.empty(), what, ": the model has no active adapter; name the adapters to merge");
    names.push_back(active);
  }
  for (size_t i = 0; i < names.size(); ++i) {
    TORCH_CHECK_VALUE(std::find(names.begin(), names.begin() + i, names[i]) == names.begin() + i, what, ": adapter \"",
                      names[i], "\" is named twice");
  }
  for (const auto& name : names) {
    require_adapter(layers, name, what);
    for (const auto& [path, table] : layers) {
      TORCH_CHECK_VALUE(!table->has(name) || table->is_merged(name) || table->enabled(), what,
                        ": adapters are disabled in \"", path, "\"; enable_adapters() first");
    }
  }
  // As PEFT: a layer that has an adapter merged already keeps it as it is (no error), and that is said.
  std::vector<std::vector<std::string>> plan;
  std::vector<std::string> again;
  size_t merging = 0;
  for (const auto& [path, table] : layers) {
    std::vector<std::string> mine;
    for (const auto& name : names) {
      if (!table->has(name)) continue;
      if (table->is_merged(name)) {
        again.push_back("\"" + name + "\" in \"" + path + "\"");
      } else {
        mine.push_back(name);
      }
    }
    merging += mine.empty() ? 0 : 1;
    plan.push_back(std::move(mine));
  }
  if (!again.empty()) {
    std::string shown;
    for (size_t i = 0; i < again.size() && i < 3; ++i) shown += (i ? ", " : "") + again[i];
    TORCH_WARN(what, ": already merged, left as it is: ", shown,
               again.size() > 3 ? " and " + std::to_string(again.size() - 3) + " more" : std::string(), "; ",
               merging == 0 ? std::string("nothing to do") : "merging into " + std::to_string(merging) + " layers");
  }
  return plan;
}

void check_unmerge(const LayerTables& layers, const std::string& what) {
  const bool any = std::any_of(layers.begin(), layers.end(), [](const auto& l) { return !l.second->merged().empty(); });
  TORCH_CHECK_VALUE(any, what, ": nothing is merged in this model");
}

bool starts_disabled(const LayerTables& layers) {
  return !layers.empty() &&
         std::all_of(layers.begin(), layers.end(), [](const auto& l) { return !l.second->enabled(); });
}

std::string bias_mode(const LayerTables& layers, const std::string& active) {
  for (const auto& [path, table] : layers) {
    if (table->has(active)) return table->options(active).bias();
  }
  return "none";
}

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_bias(const std::string& name) { return name == "bias" || ends_with(name, ".bias"); }

// A parameter's name without the "base_layer" components that LoRA layers put in paths: the same parameter before and
// after wrapping, however deep ("attn.base_layer.out_proj.base_layer.bias" and "attn.out_proj.bias").
std::string unwrapped(const std::string& name) {
  std::string out;
  size_t start = 0;
  while (start <= name.size()) {
    size_t dot = name.find('.', start);
    if (dot == std::string::npos) dot = name.size();
    const std::string part = name.substr(start, dot - start);
    if (part != "base_layer") out += (out.empty() ? "" : ".") + part;
    start = dot + 1;
  }
  return out;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out;
  for (const auto d : shape) out += (out.empty() ? "" : ", ") + std::to_string(d);
  return "[" + out + "]";
}

}  // namespace

std::vector<std::string> trained_biases(const LayerTables& layers, const std::vector<std::string>& parameter_names,
                                        const std::string& adapter, const std::vector<std::string>& kept_whole) {
  const std::string mode = bias_mode(layers, adapter);
  std::set<std::string> wanted;  // unwrapped names: a layer's base bias however its base is nested
  if (mode == "lora_only") {
    for (const auto& [path, table] : layers) {
      if (table->has(adapter)) wanted.insert(unwrapped(path + ".bias"));
    }
  }
  std::vector<std::string> out;
  for (const auto& name : parameter_names) {
    const bool inside_kept = std::any_of(kept_whole.begin(), kept_whole.end(), [&](const std::string& path) {
      return name.size() > path.size() && name.compare(0, path.size(), path) == 0 && name[path.size()] == '.';
    });
    const bool lora_only = !wanted.empty() && is_bias(name) && name.find("base_layer") != std::string::npos &&
                           wanted.count(unwrapped(name)) != 0;
    if (!inside_kept && ((mode == "all" && is_bias(name)) || lora_only)) out.push_back(name);
  }
  return out;
}

std::vector<std::string> match_biases(const std::vector<std::pair<std::string, std::vector<int64_t>>>& file_biases,
                                      const std::vector<std::pair<std::string, std::vector<int64_t>>>& parameters,
                                      const std::string& what) {
  const std::map<std::string, std::vector<int64_t>> shapes(parameters.begin(), parameters.end());
  std::map<std::string, std::vector<std::string>> by_unwrapped;  // the same bias before and after wrapping
  for (const auto& [name, shape] : parameters) {
    if (is_bias(name)) by_unwrapped[unwrapped(name)].push_back(name);
  }
  std::vector<std::string> out;
  for (const auto& [name, shape] : file_biases) {
    std::string target = name;
    if (shapes.count(target) == 0) {
      const auto it = by_unwrapped.find(unwrapped(name));
      TORCH_CHECK_VALUE(it != by_unwrapped.end() && is_bias(name), what, ": the file has bias \"", name,
                        "\", which the model lacks");
      TORCH_CHECK_VALUE(it->second.size() == 1, what, ": the file's bias \"", name, "\" could be any of ",
                        it->second.size(), " parameters of the model (\"", it->second.front(), "\", ...)");
      target = it->second.front();
    }
    const auto it = shapes.find(target);
    TORCH_CHECK_VALUE(it->second == shape, what, ": bias \"", name, "\" is ", shape_str(shape), " in the file but ",
                      shape_str(it->second), " in the model");
    out.push_back(target);
  }
  return out;
}

void check_not_tied(const std::vector<std::pair<std::string, int64_t>>& parameters,
                    const std::vector<std::string>& merging, const std::string& what, const std::string& consequence) {
  std::map<int64_t, std::vector<std::string>> names;
  for (const auto& [name, id] : parameters) names[id].push_back(name);
  for (const auto& path : merging) {
    const std::string prefix = path + ".";
    for (const auto& [name, id] : parameters) {
      if (name.rfind(prefix, 0) != 0) continue;
      for (const auto& other : names[id]) {
        TORCH_CHECK_VALUE(other.rfind(prefix, 0) == 0, what, ": \"", name, "\" is also \"", other,
                          "\" (tied weights): ",
                          consequence.empty() ? "merging into it would change that module too. Give the layer a weight "
                                                "of its own first (untie them), or keep the adapter unmerged"
                                              : consequence);
      }
    }
  }
}

}  // namespace lorafuse::rules
