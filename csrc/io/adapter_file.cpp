// Reading, validating and writing PEFT-format adapter folders, and matching them against a model.
#include <ATen/ops/all.h>
#include <ATen/ops/count_nonzero.h>
#include <ATen/ops/isfinite.h>
#include <c10/util/Exception.h>
#include <dirent.h>
#include <fcntl.h>
#include <lorafuse/io/adapter.h>
#include <lorafuse/io/files.h>
#include <lorafuse/io/safetensors.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

namespace lorafuse::io {
namespace {

constexpr const char* kPrefix = "base_model.model.";
constexpr const char* kMagnitude = ".lora_magnitude_vector";  // DoRA; PEFT drops the module's ".weight"
constexpr const char* kBaseWeight = ".base_layer.weight";     // PEFT's save_embedding_layers

std::string join_path(const std::string& dir, const std::string& name) {
  return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

std::string last_component(const std::string& path) {
  const auto dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

// ---- the tensors of a file ------------------------------------------------------------------------

void check_weight(const std::string& file, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() > 0, file, ": tensor \"", name, "\" has no elements (shape ", shape_str(t),
                    "). Files saved from partitioned training (DeepSpeed ZeRO-3, FSDP) without gathering the full "
                    "parameters hold such empty placeholders; save the adapter again with the parameters gathered");
  TORCH_CHECK_VALUE(t.dim() == 2, file, ": tensor \"", name, "\" has shape ", shape_str(t),
                    "; LoRA weights are matrices (lora_A [r, in], lora_B [out, r])");
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()) && t.element_size() >= 2, file, ": tensor \"", name,
                    "\" has dtype ", t.scalar_type(), "; expected float32, float16, bfloat16 or float64");
  TORCH_CHECK_VALUE(at::isfinite(t).all().item<bool>(), file, ": tensor \"", name,
                    "\" holds non-finite values (inf or nan); the adapter would make every output non-finite");
}

void collect_tensors(AdapterFile& file, const std::string& weights_path, Safetensors&& st) {
  std::map<std::string, size_t> layer_of;  // module path → index into file.layers
  auto layer = [&](const std::string& path) -> AdapterLayer& {
    auto it = layer_of.find(path);
    if (it == layer_of.end()) {
      it = layer_of.emplace(path, file.layers.size()).first;
      file.layers.push_back({path, {}, {}, {}, false});
    }
    return file.layers[it->second];
  };
  // modules_to_save: the outermost module path of the tensor that ends with an entry (PEFT's rule), else ""
  const auto saved_names = file.config.saved_modules();
  auto saved_module_of = [&](const std::string& rest) -> std::string {
    for (size_t dot = rest.find('.'); dot != std::string::npos; dot = rest.find('.', dot + 1)) {
      const std::string prefix = rest.substr(0, dot);
      if (file.config.saves_module(prefix)) return prefix;
    }
    return "";
  };
  std::map<std::string, size_t> saved_of;  // module path → index into file.saved_modules
  for (auto& [name, tensor] : st.tensors) {
    TORCH_CHECK_VALUE(starts_with(name, kPrefix), weights_path, ": tensor \"", name,
                      "\" is not named as PEFT names adapter tensors (base_model.model.<module>.lora_A.weight)");
    const std::string rest = name.substr(std::strlen(kPrefix));
    for (const char* which : {".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"}) {
      if (ends_with(rest, which) && rest.size() > std::strlen(which)) {
        const std::string path = rest.substr(0, rest.size() - std::strlen(which));
        check_weight(weights_path, name, tensor);
        const bool embedding = std::strstr(which, "embedding") != nullptr;
        AdapterLayer& l = layer(path);
        TORCH_CHECK_VALUE(!(l.lora_A.defined() || l.lora_B.defined()) || l.embedding == embedding, weights_path,
                          ": module \"", path,
                          "\" has both a Linear layer's tensors (lora_A.weight / lora_B.weight) and an embedding's "
                          "(lora_embedding_A / lora_embedding_B)");
        l.embedding = embedding;
        auto& entry = which[std::strlen(which) - (embedding ? 1 : 8)] == 'A' ? l.lora_A : l.lora_B;
        entry = std::move(tensor);
        goto next;
      }
    }
    if (!saved_names.empty()) {
      const std::string module = saved_module_of(rest);
      if (!module.empty()) {
        TORCH_CHECK_VALUE(!at::isFloatingType(tensor.scalar_type()) || at::isfinite(tensor).all().item<bool>(),
                          weights_path, ": tensor \"", name, "\" (of \"", module,
                          "\", which modules_to_save trains whole) holds non-finite values (inf or nan)");
        const std::string key = rest.substr(module.size() + 1);
        // PEFT's files with bias "all" also hold the wrapper's own bias names (<module>.original_module.bias,
        // <module>.modules_to_save.bias): the original's and the copy's biases again, which the module's state holds
        if (starts_with(key, "original_module.") || starts_with(key, "modules_to_save.")) continue;
        auto it = saved_of.find(module);
        if (it == saved_of.end()) {
          it = saved_of.emplace(module, file.saved_modules.size()).first;
          file.saved_modules.push_back({module, {}});
        }
        file.saved_modules[it->second].state.emplace_back(key, std::move(tensor));
        continue;
      }
    }
    if (ends_with(rest, kMagnitude) && rest.size() > std::strlen(kMagnitude)) {
      TORCH_CHECK_VALUE(file.config.use_dora(), weights_path, ": tensor \"", name,
                        "\" is a DoRA magnitude vector, but adapter_config.json says use_dora = false");
      TORCH_CHECK_VALUE(tensor.dim() == 1 && tensor.numel() > 0, weights_path, ": tensor \"", name, "\" has shape ",
                        shape_str(tensor), "; a DoRA magnitude vector is 1-D [out]");
      TORCH_CHECK_VALUE(at::isFloatingType(tensor.scalar_type()) && tensor.element_size() >= 2, weights_path,
                        ": tensor \"", name, "\" has dtype ", tensor.scalar_type(),
                        "; expected float32, float16, bfloat16 or float64");
      TORCH_CHECK_VALUE(at::isfinite(tensor).all().item<bool>(), weights_path, ": tensor \"", name,
                        "\" holds non-finite values (inf or nan)");
      layer(rest.substr(0, rest.size() - std::strlen(kMagnitude))).magnitude = std::move(tensor);
      continue;
    }
    if (ends_with(rest, kBaseWeight) && rest.size() > std::strlen(kBaseWeight)) {
      check_weight(weights_path, name, tensor);
      file.base_weights.emplace_back(rest.substr(0, rest.size() - std::strlen(kBaseWeight)), std::move(tensor));
      continue;
    }
    if (ends_with(rest, ".bias") || rest == "bias") {
      TORCH_CHECK_VALUE(file.config.bias() != "none", weights_path, ": tensor \"", name,
                        "\" is a bias, but adapter_config.json says bias = \"none\"");
      TORCH_CHECK_VALUE(tensor.numel() > 0 && at::isFloatingType(tensor.scalar_type()), weights_path, ": bias \"", name,
                        "\" is empty or not floating point (", tensor.scalar_type(), ", shape ", shape_str(tensor),
                        ")");
      TORCH_CHECK_VALUE(at::isfinite(tensor).all().item<bool>(), weights_path, ": bias \"", name,
                        "\" holds non-finite values (inf or nan)");
      file.biases.emplace_back(rest, std::move(tensor));
      continue;
    }
    TORCH_CHECK_VALUE(false, weights_path, ": unexpected tensor \"", name,
                      "\"; an adapter file holds base_model.model.<module>.lora_A.weight / .lora_B.weight (or an "
                      "embedding's .lora_embedding_A / _B, DoRA's .lora_magnitude_vector, a base layer's "
                      ".base_layer.weight, the state of a module that modules_to_save names)");
  next:;
  }
  std::vector<std::string> zero_b;
  for (const auto& l : file.layers) {
    TORCH_CHECK_VALUE(l.lora_A.defined() && l.lora_B.defined(), weights_path, ": module \"", l.path, "\" has ",
                      l.lora_A.defined() ? "lora_A but no lora_B" : "lora_B but no lora_A",
                      "; each adapted module needs both");
    const int64_t r = l.lora_A.size(0);
    TORCH_CHECK_VALUE(l.lora_B.size(1) == r, weights_path, ": module \"", l.path, "\": lora_A is ", shape_str(l.lora_A),
                      " (rank ", r, ") but lora_B is ", shape_str(l.lora_B), "; expected lora_B [out, ", r, "]");
    TORCH_CHECK_VALUE(!file.config.use_dora() || l.magnitude.defined(), weights_path, ": module \"", l.path,
                      "\" has no lora_magnitude_vector, but adapter_config.json says use_dora = true (DoRA)");
    TORCH_CHECK_VALUE(!l.magnitude.defined() || l.magnitude.size(0) == l.lora_B.size(0), weights_path, ": module \"",
                      l.path, "\": lora_magnitude_vector is ", shape_str(l.magnitude), " but lora_B is ",
                      shape_str(l.lora_B), "; expected [", l.lora_B.size(0), "]");
    const int64_t expected = file.config.adapter_for(l.path).r();
    TORCH_CHECK_VALUE(r == expected, weights_path, ": module \"", l.path, "\" has rank ", r,
                      " but adapter_config.json gives it r = ", expected,
                      " (r, or rank_pattern); the file and its config disagree");
    if (l.lora_B.count_nonzero().item<int64_t>() == 0) zero_b.push_back(l.path);
  }
  TORCH_CHECK_VALUE(!file.layers.empty(), weights_path,
                    ": holds no LoRA weights (no base_model.model.<module>.lora_A.weight)");
  for (const auto& [path, t] : file.base_weights) {
    TORCH_CHECK_VALUE(
        std::any_of(file.layers.begin(), file.layers.end(), [&](const auto& l) { return l.path == path; }),
        weights_path, ": tensor \"", kPrefix, path, kBaseWeight,
        "\" is the base weight of a module that the file does not adapt");
  }
  if (!zero_b.empty()) {
    file.warnings.push_back(weights_path + ": lora_B is all zeros in " + std::to_string(zero_b.size()) + " of " +
                            std::to_string(file.layers.size()) + " modules (" + list_some(zero_b, 3) +
                            "); there the adapter changes nothing (saved before training?)");
  }
}

std::string escape_regex(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::strchr(".^$|()[]{}*+?\\", c) != nullptr) out += '\\';
    out += c;
  }
  return out;
}

// The most common value of `values`, the first of those on a tie.
template <typename T>
T most_common(const std::vector<T>& values) {
  T best = values.front();
  size_t best_count = 0;
  for (const auto& v : values) {
    const auto n = static_cast<size_t>(std::count(values.begin(), values.end(), v));
    if (n > best_count) best = v, best_count = n;
  }
  return best;
}

// Which Linear modules `config` selects (no errors: for comparing and for the missing-targets check).
std::vector<size_t> selected(const std::vector<ModuleInfo>& modules, const LoraConfig& config) {
  std::vector<size_t> out;
  for (size_t i = 0; i < modules.size(); ++i) {
    const auto& m = modules[i];
    if (!m.takes_lora() || !config.selects(m.path) || config.inside_saved_module(m.path)) continue;
    if (!config.exclude_modules().empty() && config.exclude_modules().matches(m.path)) continue;
    out.push_back(i);
  }
  return out;
}

}  // namespace

std::string lora_tensor_name(const std::string& module_path, char which, bool embedding) {
  TORCH_CHECK_VALUE(which == 'A' || which == 'B' || which == 'M', "lora_tensor_name: which must be 'A', 'B' or 'M'");
  if (embedding && which != 'M') return std::string(kPrefix) + module_path + ".lora_embedding_" + which;
  return std::string(kPrefix) + module_path +
         (which == 'A'   ? ".lora_A.weight"
          : which == 'B' ? ".lora_B.weight"
                         : kMagnitude);
}

AdapterFile read_adapter(const std::string& dir) {
  struct stat st;
  TORCH_CHECK_VALUE(::stat(dir.c_str(), &st) == 0, "adapter folder \"", dir, "\" does not exist");
  TORCH_CHECK_VALUE(S_ISDIR(st.st_mode), "adapter folder \"", dir,
                    "\" is not a folder; expected a folder holding adapter_config.json and adapter_model.safetensors");
  const std::string config_path = join_path(dir, kAdapterConfigFile);
  const std::string weights_path = join_path(dir, kAdapterWeightsFile);
  TORCH_CHECK_VALUE(::stat(config_path.c_str(), &st) == 0, config_path,
                    ": missing; an adapter folder holds adapter_config.json and adapter_model.safetensors");
  TORCH_CHECK_VALUE(S_ISREG(st.st_mode), config_path, ": is a folder or a special file, not a JSON file");
  AdapterFile file = parse_adapter_config(read_text(config_path, config_path), config_path);
  if (::stat(weights_path.c_str(), &st) != 0) {
    const std::string bin = join_path(dir, "adapter_model.bin");
    TORCH_CHECK_VALUE(::stat(bin.c_str(), &st) != 0, weights_path,
                      ": missing; the folder has adapter_model.bin, a "
                      "pickle file, which lorafuse never loads (pickle can run code). Convert it with PEFT "
                      "(save_pretrained(..., safe_serialization=True))");
    TORCH_CHECK_VALUE(false, weights_path,
                      ": missing; an adapter folder holds adapter_config.json and "
                      "adapter_model.safetensors");
  }
  TORCH_CHECK_VALUE(S_ISREG(st.st_mode), weights_path, ": is a folder or a special file, not a safetensors file");
  collect_tensors(file, weights_path, read_safetensors(weights_path));
  return file;
}

void write_adapter(const std::string& dir, const AdapterFile& file) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& l : file.layers) {
    tensors.emplace_back(lora_tensor_name(l.path, 'A', l.embedding), l.lora_A);
    tensors.emplace_back(lora_tensor_name(l.path, 'B', l.embedding), l.lora_B);
    if (l.magnitude.defined()) tensors.emplace_back(lora_tensor_name(l.path, 'M'), l.magnitude);
  }
  for (const auto& [path, t] : file.biases) tensors.emplace_back(kPrefix + path, t);
  for (const auto& m : file.saved_modules) {
    for (const auto& [key, t] : m.state) tensors.emplace_back(kPrefix + m.path + "." + key, t);
  }
  replace_folder_atomically("save_adapter", dir,
                            {{kAdapterConfigFile, adapter_config_json(file)},
                             {kAdapterWeightsFile, serialize_safetensors(tensors, {{"format", "pt"}})}});
}

std::vector<LoadTarget> plan_adapter_load(const AdapterFile& file, const std::vector<ModuleInfo>& modules,
                                          bool partial) {
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < modules.size(); ++i) index.emplace(modules[i].path, i);
  // an attention module's output projection: <path>.base_layer.out_proj in the file, modules[<path>] in the model
  auto attention_of = [&](const std::string& path) -> const size_t* {
    const std::string suffix = kAttentionOutProj;
    if (!ends_with(path, suffix) || path.size() == suffix.size()) return nullptr;
    const auto it = index.find(path.substr(0, path.size() - suffix.size()));
    return it != index.end() && modules[it->second].is_attention ? &it->second : nullptr;
  };
  std::vector<std::string> absent;
  for (const auto& l : file.layers) {
    if (!index.count(l.path) && attention_of(l.path) == nullptr) absent.push_back(l.path);
  }
  TORCH_CHECK_VALUE(absent.empty(), "load_adapter: ", absent.size(),
                    " module(s) of the adapter file are not in the model: ", list_some(absent),
                    ". Is this adapter for another model?");
  std::vector<LoadTarget> plan;
  for (const auto& l : file.layers) {
    const size_t* attention = index.count(l.path) ? nullptr : attention_of(l.path);
    const size_t i = attention != nullptr ? *attention : index.at(l.path);
    const auto& m = modules[i];
    TORCH_CHECK_VALUE(l.embedding ? m.is_embedding : (m.is_linear || m.is_attention),
                      "load_adapter: the file adapts \"", l.path, "\" as ",
                      l.embedding ? "an embedding layer (lora_embedding_A/B)" : "a Linear layer (lora_A/B)",
                      ", which it is not in this model (its type: ", m.type_name, ")");
    // an attention module's output projection maps embed_dim to embed_dim (its in_features)
    const int64_t in = m.in_features, out = attention != nullptr ? m.in_features : m.out_features;
    const int64_t r = l.lora_A.size(0);
    TORCH_CHECK_VALUE(l.lora_A.size(1) == in, "load_adapter: \"", l.path, "\": lora_A is ", shape_str(l.lora_A),
                      " but the layer takes ", in, " inputs; expected [", r, ", ", in, "]");
    TORCH_CHECK_VALUE(l.lora_B.size(0) == out, "load_adapter: \"", l.path, "\": lora_B is ", shape_str(l.lora_B),
                      " but the layer gives ", out, " outputs; expected [", out, ", ", r, "]");
    TORCH_CHECK_VALUE(!l.magnitude.defined() || l.magnitude.size(0) == out, "load_adapter: \"", l.path,
                      "\": lora_magnitude_vector is ", shape_str(l.magnitude), " but the layer gives ", out,
                      " outputs; expected [", out, "]");
    at::Tensor base_weight;
    for (const auto& [path, t] : file.base_weights) {
      if (path == l.path) base_weight = t;
    }
    TORCH_CHECK_VALUE(!base_weight.defined() || base_weight.numel() == in * out, "load_adapter: \"", l.path,
                      "\": the file's base weight is ", shape_str(base_weight), " but the layer's weight has ", in,
                      " × ", out, " elements");
    plan.push_back(
        {i, file.config.adapter_for(m.path), l.lora_A, l.lora_B, l.magnitude, base_weight, attention != nullptr});
  }
  // an attention module needs both parts
  for (const auto& t : plan) {
    if (!modules[t.index].is_attention) continue;
    const bool both =
        std::count_if(plan.begin(), plan.end(), [&](const LoadTarget& o) { return o.index == t.index; }) == 2;
    TORCH_CHECK_VALUE(both, "load_adapter: the file adapts the attention module \"", modules[t.index].path,
                      "\" without its ", t.out_proj ? "packed q/k/v projection (" : "output projection (",
                      modules[t.index].path, t.out_proj ? "" : kAttentionOutProj,
                      ".lora_A.weight); PEFT's MultiheadAttention adapters have both");
  }
  // "all-linear" (PEFT writes the names it stands for; a hand-written file may say it) leaves out the model's output
  // layer, which the module list here does not know: the file's tensors are the targets then.
  if (!file.targets_from_file && !partial && !file.config.target_modules().is_all_linear()) {
    std::vector<std::string> missing;
    for (size_t i : selected(modules, file.config)) {
      if (std::none_of(file.layers.begin(), file.layers.end(),
                       [&](const auto& l) { return l.path == modules[i].path; }))
        missing.push_back(modules[i].path);
    }
    TORCH_CHECK_VALUE(
        missing.empty(), "load_adapter: adapter_config.json targets ", file.config.target_modules().str(),
        ", but the file has no weights for ", missing.size(), " of those layers in this model: ", list_some(missing),
        ". Load with partial (partial=True in Python, LoadAdapterOptions().partial(true) in C++) to adapt only the "
        "layers the file has");
  }
  return plan;
}

std::vector<SavedModuleLoad> plan_saved_modules_load(const AdapterFile& file, const std::vector<ModuleInfo>& modules,
                                                     bool partial, std::vector<std::string>& warnings,
                                                     const std::vector<LoadTarget>& lora_targets) {
  std::vector<SavedModuleLoad> plan;
  if (file.config.saved_modules().empty()) return plan;
  std::vector<size_t> lora;
  for (const auto& t : lora_targets) lora.push_back(t.index);
  const auto chosen = select_saved_modules(modules, file.config, /*strict=*/false, &warnings, lora);
  std::vector<bool> has_state(chosen.size(), false);
  for (const auto& m : file.saved_modules) {
    const auto it = std::find_if(chosen.begin(), chosen.end(), [&](size_t i) { return modules[i].path == m.path; });
    TORCH_CHECK_VALUE(it != chosen.end(), "load_adapter: the file holds the state of \"", m.path,
                      "\" (modules_to_save), which this model lacks or does not name so: is this adapter for another "
                      "model?");
    has_state[static_cast<size_t>(it - chosen.begin())] = true;
    plan.push_back({*it, m.state});
  }
  std::vector<std::string> missing;
  for (size_t k = 0; k < chosen.size(); ++k) {
    if (!has_state[k]) missing.push_back(modules[chosen[k]].path);
  }
  TORCH_CHECK_VALUE(partial || missing.empty(), "load_adapter: adapter_config.json's modules_to_save names ",
                    list_some(missing), " in this model, but the file holds no state for ",
                    missing.size() == 1 ? "it" : "them",
                    ". Load with partial (partial=True in Python, LoadAdapterOptions().partial(true) in C++) to keep "
                    "the model's own module there");
  return plan;
}

void check_saved_state(const std::string& path, const std::vector<std::pair<std::string, std::vector<int64_t>>>& own,
                       const std::vector<std::pair<std::string, at::Tensor>>& state) {
  std::vector<std::string> missing, unexpected;
  for (const auto& [key, sizes] : own) {
    const auto it = std::find_if(state.begin(), state.end(), [&](const auto& kv) { return kv.first == key; });
    if (it == state.end()) {
      missing.push_back(key);
      continue;
    }
    TORCH_CHECK_VALUE(it->second.sizes() == c10::IntArrayRef(sizes), "load_adapter: \"", path,
                      "\" (modules_to_save): the file's \"", key, "\" is ", shape_str(it->second),
                      " but the module's is ", c10::IntArrayRef(sizes));
  }
  for (const auto& [key, t] : state) {
    if (std::none_of(own.begin(), own.end(), [&](const auto& kv) { return kv.first == key; }))
      unexpected.push_back(key);
  }
  TORCH_CHECK_VALUE(missing.empty() && unexpected.empty(), "load_adapter: \"", path,
                    "\" (modules_to_save): the file's state does not fit the module",
                    missing.empty() ? "" : "; the file lacks " + list_some(missing),
                    unexpected.empty() ? "" : "; the module has no " + list_some(unexpected));
}

AdapterFile describe_adapter(const std::vector<ModuleInfo>& modules, const std::vector<SaveSource>& layers,
                             std::vector<std::pair<std::string, at::Tensor>> biases, std::vector<SavedModule> saved) {
  TORCH_CHECK_VALUE(!layers.empty(), "save_adapter: no layer has this adapter");
  AdapterFile file;
  const auto& first = layers.front();
  std::vector<int64_t> ranks;
  std::vector<double> alphas;
  for (const auto& l : layers) {
    const auto& a = l.adapter;
    const auto& path = modules.at(l.index).path;
    TORCH_CHECK_VALUE(a.lora_dropout() == first.adapter.lora_dropout() &&
                          a.use_rslora() == first.adapter.use_rslora() && a.bias() == first.adapter.bias() &&
                          a.task_type() == first.adapter.task_type() && a.use_dora() == first.adapter.use_dora(),
                      "save_adapter: layers \"", modules.at(first.index).path, "\" and \"", path,
                      "\" disagree on lora_dropout, use_rslora, bias, task_type or use_dora, which PEFT's format keeps "
                      "once per adapter");
    TORCH_CHECK_VALUE(a.use_dora() == l.magnitude.defined(), "save_adapter: layer \"", path, "\": ",
                      a.use_dora() ? "a DoRA adapter without its magnitude vector" : "a magnitude vector without DoRA");
    if (l.out_proj) continue;  // an attention module's output projection: its module's options, written once
    ranks.push_back(a.r());
    alphas.push_back(a.lora_alpha());
  }
  LoraConfig& c = file.config;
  c.r(most_common(ranks))
      .lora_alpha(most_common(alphas))
      .lora_dropout(first.adapter.lora_dropout())
      .use_rslora(first.adapter.use_rslora())
      .bias(first.adapter.bias())
      .task_type(first.adapter.task_type())
      .use_dora(first.adapter.use_dora())
      .init_lora_weights(first.adapter.init_lora_weights())
      .loftq_config(first.adapter.loftq_config());
  // target_modules: the layers' own names ("q_proj", ...) when they select exactly these layers.
  std::vector<size_t> wanted;
  std::vector<std::string> names, paths;
  for (const auto& l : layers) {
    if (l.out_proj) continue;
    wanted.push_back(l.index);
    paths.push_back(modules.at(l.index).path);
    const auto leaf = last_component(paths.back());
    if (std::find(names.begin(), names.end(), leaf) == names.end()) names.push_back(leaf);
  }
  std::sort(wanted.begin(), wanted.end());
  c.target_modules(TargetModules(names));
  if (selected(modules, c) != wanted) {
    c.target_modules(TargetModules(paths));
    TORCH_CHECK_VALUE(selected(modules, c) == wanted,
                      "save_adapter: cannot name exactly the adapted layers in "
                      "target_modules");
  }
  // rank_pattern / alpha_pattern for the layers off the common values: by name when that is unambiguous.
  auto patterns = [&](auto value_of, auto common, auto& out) {
    std::map<std::string, bool> name_ok;
    for (const auto& l : layers) {
      const auto leaf = last_component(modules.at(l.index).path);
      bool same = true;
      for (const auto& o : layers) {
        if (last_component(modules.at(o.index).path) == leaf) same = same && value_of(o.adapter) == value_of(l.adapter);
      }
      name_ok[leaf] = same;
    }
    for (const auto& l : layers) {
      if (l.out_proj || value_of(l.adapter) == common) continue;
      const auto& path = modules.at(l.index).path;
      const auto leaf = last_component(path);
      const std::string key = name_ok[leaf] ? leaf : escape_regex(path);
      if (std::none_of(out.begin(), out.end(), [&](const auto& kv) { return kv.first == key; }))
        out.emplace_back(key, value_of(l.adapter));
    }
  };
  PatternMap<int64_t> rank_pattern;
  PatternMap<double> alpha_pattern;
  patterns([](const nn::LoraAdapterOptions& a) { return a.r(); }, c.r(), rank_pattern);
  patterns([](const nn::LoraAdapterOptions& a) { return a.lora_alpha(); }, c.lora_alpha(), alpha_pattern);
  c.rank_pattern(rank_pattern).alpha_pattern(alpha_pattern);
  for (const auto& l : layers) {
    const auto& path = modules.at(l.index).path;
    const auto back = c.adapter_for(path);
    TORCH_CHECK_VALUE(back.r() == l.adapter.r() && back.lora_alpha() == l.adapter.lora_alpha(), "save_adapter: \"",
                      path, "\"", l.out_proj ? "'s output projection" : "",
                      ": the written config does not reproduce its rank and lora_alpha");
    file.layers.push_back({l.out_proj ? path + kAttentionOutProj : path, l.lora_A, l.lora_B, l.magnitude,
                           modules.at(l.index).is_embedding});
  }
  file.biases = std::move(biases);
  // modules_to_save: the saved modules' last names when they name exactly these modules (PEFT's suffix rule), else
  // their paths
  if (!saved.empty()) {
    std::vector<std::string> leaves, saved_paths;
    for (const auto& m : saved) {
      saved_paths.push_back(m.path);
      const auto leaf = last_component(m.path);
      if (std::find(leaves.begin(), leaves.end(), leaf) == leaves.end()) leaves.push_back(leaf);
    }
    auto names_exactly = [&](const std::vector<std::string>& names) {
      LoraConfig probe = c;
      probe.modules_to_save(names).task_type("");
      for (const auto& m : modules) {
        const bool wanted = std::find(saved_paths.begin(), saved_paths.end(), m.path) != saved_paths.end();
        if (probe.saves_module(m.path) != wanted) return false;
      }
      return true;
    };
    c.modules_to_save(names_exactly(leaves) ? leaves : saved_paths);
    TORCH_CHECK_VALUE(names_exactly(c.modules_to_save()),
                      "save_adapter: cannot name exactly the modules that the adapter trains whole in modules_to_save");
    file.saved_modules = std::move(saved);
  }
  return file;
}

}  // namespace lorafuse::io
