// Hugging Face checkpoint folders and bitsandbytes' NF4 tensors in them (see <lorafuse/io/checkpoint.h>).
#include <c10/util/Exception.h>
#include <lorafuse/io/checkpoint.h>
#include <lorafuse/io/files.h>
#include <sys/stat.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>

#include "csrc/config/json.h"

namespace lorafuse::io {
namespace {

using json = nlohmann::ordered_json;
using lorafuse::detail::parse_json;

std::string join_path(const std::string& dir, const std::string& name) {
  return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

}  // namespace

CheckpointReader::CheckpointReader(const std::string& dir) : dir_(dir) {
  struct stat st;
  TORCH_CHECK_VALUE(::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "load_checkpoint: \"", dir,
                    "\" is not a folder; expected a checkpoint folder (config.json, model.safetensors)");
  const std::string config_path = join_path(dir, kModelConfigFile);
  if (is_file(config_path)) {
    config_json_ = read_text(config_path, config_path);
    const json config = parse_json(config_json_, config_path);
    TORCH_CHECK_VALUE(config.is_object(), config_path, ": expected a JSON object, found ", config.type_name());
    if (config.contains("quantization_config") && !config["quantization_config"].is_null()) {
      quant_config_ =
          QuantConfig::from_hf_json(config["quantization_config"].dump(), config_path + ": quantization_config");
    }
  }
  const std::string single = join_path(dir, kModelWeightsFile);
  const std::string index_path = join_path(dir, kModelIndexFile);
  if (is_file(single)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single));
    for (const auto& e : files_.back()->entries()) where_[e.name] = 0;
    return;
  }
  TORCH_CHECK_VALUE(is_file(index_path), "load_checkpoint: \"", dir, "\" has neither ", kModelWeightsFile, " nor ",
                    kModelIndexFile, " (lorafuse reads safetensors checkpoints only)");
  const json index = parse_json(read_text(index_path, index_path), index_path);
  TORCH_CHECK_VALUE(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(), index_path,
                    ": expected an object with a \"weight_map\" object (tensor name -> file)");
  std::map<std::string, size_t> file_index;
  std::map<std::string, std::string> listed;
  for (const auto& [name, file] : index["weight_map"].items()) {
    TORCH_CHECK_VALUE(file.is_string(), index_path, ": weight_map[\"", name, "\"]: expected a file name, found ",
                      file.dump());
    const std::string f = file.get<std::string>();
    TORCH_CHECK_VALUE(!f.empty() && f.find('/') == std::string::npos && f != "." && f != "..", index_path,
                      ": weight_map[\"", name, "\"]: \"", f, "\" is not a file name in the checkpoint's folder");
    if (!file_index.count(f)) {
      file_index[f] = files_.size();
      files_.push_back(std::make_unique<SafetensorsFile>(join_path(dir, f)));
    }
    listed[name] = f;
  }
  for (size_t i = 0; i < files_.size(); ++i) {
    for (const auto& e : files_[i]->entries()) {
      TORCH_CHECK_VALUE(!where_.count(e.name), "load_checkpoint: \"", e.name,
                        "\" is in two shards: ", files_[where_[e.name]]->path(), " and ", files_[i]->path());
      where_[e.name] = i;
    }
  }
  for (const auto& [name, f] : listed) {
    const auto it = where_.find(name);
    TORCH_CHECK_VALUE(it != where_.end() && files_[it->second]->path() == join_path(dir, f), index_path, ": \"", name,
                      "\" is listed in ", f, ", which does not hold it");
  }
  TORCH_CHECK_VALUE(listed.size() == where_.size(), index_path, ": the shards hold ", where_.size() - listed.size(),
                    " tensor(s) that the index does not list");
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  for (const auto& f : files_) {
    for (const auto& e : f->entries()) out.push_back(e.name);
  }
  return out;
}

const SafetensorsEntry& CheckpointReader::entry(const std::string& name) const {
  const auto it = where_.find(name);
  TORCH_CHECK_VALUE(it != where_.end(), "load_checkpoint: ", dir_, ": no tensor named \"", name, "\"");
  return *files_[it->second]->find(name);
}

at::Tensor CheckpointReader::read(const std::string& name) const {
  const auto it = where_.find(name);
  TORCH_CHECK_VALUE(it != where_.end(), "load_checkpoint: ", dir_, ": no tensor named \"", name, "\"");
  return files_[it->second]->read(name);
}

std::vector<std::string> CheckpointReader::nf4_weights() const {
  std::vector<std::string> out;
  for (const auto& name : names()) {
    if (auto weight = nf4_weight_of_state(name)) out.push_back(*weight);
  }
  return out;
}

Nf4Tensor CheckpointReader::read_nf4(const std::string& name) const {
  return read_nf4_tensors(
      name, [&](const std::string& n) { return contains(n) ? read(n) : at::Tensor(); }, "load_checkpoint: " + dir_);
}

std::vector<std::string> CheckpointReader::nf4_tensor_names(const std::string& name) const {
  std::vector<std::string> out;
  for (const char* suffix : {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                             ".quant_state.bitsandbytes__nf4", ".quant_state.lorafuse__nf"}) {
    if (contains(name + suffix)) out.push_back(name + suffix);
  }
  return out;
}

void write_checkpoint(const std::string& dir, const std::string& model_config_json,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::vector<std::string>& dense_modules) {
  json config = parse_json(model_config_json, "save_checkpoint: config_json");
  TORCH_CHECK_VALUE(config.is_object(), "save_checkpoint: config_json: expected a JSON object, found ",
                    config.type_name());
  // quantization_config from the NF4 weights themselves (each read back as a loader will: a writer bug stops here)
  const std::map<std::string, at::Tensor> by_name(tensors.begin(), tensors.end());
  std::map<at::ScalarType, int> dtypes;
  bool nested = false, other_formats = false;
  for (const auto& [name, tensor] : tensors) {
    const auto weight = nf4_weight_of_state(name);
    if (!weight) continue;
    const Nf4Tensor t = read_nf4_tensors(
        *weight,
        [&](const std::string& n) {
          const auto it = by_name.find(n);
          return it == by_name.end() ? at::Tensor() : it->second;
        },
        "save_checkpoint");
    if (!t.is_nf4()) {
      other_formats = true;
      continue;
    }
    ++dtypes[t.dtype];
    nested = nested || t.nested();
  }
  config.erase("quantization_config");
  // transformers' quantization_config describes bitsandbytes' NF4 only: with weights in other formats (which
  // transformers cannot read) there is none, and transformers then stops at those weights instead of misreading them
  if (!dtypes.empty() && !other_formats) {
    const auto most = std::max_element(dtypes.begin(), dtypes.end(),
                                       [](const auto& a, const auto& b) { return a.second < b.second; });
    config["quantization_config"] = parse_json(
        QuantConfig().double_quant(nested).compute_dtype(most->first).to_hf_json(dense_modules), "quantization_config");
  }
  std::vector<std::string> drop;
  const std::string index_path = join_path(dir, kModelIndexFile);
  if (is_file(index_path)) {  // a sharded checkpoint saved here before: its index and shards describe the old model
    drop.push_back(kModelIndexFile);
    try {
      const json index = parse_json(read_text(index_path, index_path), index_path);
      if (index.is_object() && index.contains("weight_map") && index["weight_map"].is_object()) {
        for (const auto& [name, file] : index["weight_map"].items()) {
          if (file.is_string() && file.get<std::string>() != kModelConfigFile) drop.push_back(file.get<std::string>());
        }
      }
    } catch (const c10::Error&) {
      // an unreadable index: dropped alone
    }
  }
  replace_folder_atomically("save_checkpoint", dir,
                            {{kModelConfigFile, config.dump(2) + "\n"},
                             {kModelWeightsFile, serialize_safetensors(tensors, {{"format", "pt"}})}},
                            drop);
}

}  // namespace lorafuse::io
