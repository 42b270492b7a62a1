// Helpers shared by the C++ example programs: building the reference Llama from a Hugging Face checkpoint folder
// (--model) or from one safetensors file and a shape (--base, --config), and reading a tensor from a safetensors
// file. Header-only, examples only.
#pragma once

#include <lorafuse/io/checkpoint.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/quant/checkpoint.h>
#include <torch/torch.h>

#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace lorafuse_example {

// Copies every parameter of `module` from the file's tensor of the same name (all must be there).
inline void load_weights(torch::nn::Module& module, const std::string& path) {
  auto file = lorafuse::io::read_safetensors(path);
  std::map<std::string, at::Tensor> tensors(file.tensors.begin(), file.tensors.end());
  torch::NoGradGuard no_grad;
  for (auto& p : module.named_parameters()) {
    auto it = tensors.find(p.key());
    TORCH_CHECK_VALUE(it != tensors.end(), path, ": no tensor \"", p.key(), "\" for the model's parameter");
    TORCH_CHECK_VALUE(it->second.sizes() == p.value().sizes(), path, ": \"", p.key(), "\" is ", it->second.sizes(),
                      ", the model's parameter is ", p.value().sizes());
    p.value().copy_(it->second);
  }
}

inline lorafuse::models::LlamaConfig parse_config(const std::string& text) {
  std::vector<int64_t> v;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) v.push_back(std::stoll(item));
  TORCH_CHECK_VALUE(v.size() == 6, "--config: expected vocab,hidden,intermediate,layers,heads,kv_heads, found \"", text,
                    "\"");
  lorafuse::models::LlamaConfig c;
  c.vocab_size(v[0])
      .hidden_size(v[1])
      .intermediate_size(v[2])
      .num_hidden_layers(v[3])
      .num_attention_heads(v[4])
      .num_key_value_heads(v[5]);
  return c;
}

// The model options every example takes: --model FOLDER, or --base FILE with --config.
struct ModelArgs {
  std::string base, model_dir;
  lorafuse::models::LlamaConfig config;

  // Takes `arg` (reading its value with `value`) if it is one of the model options.
  template <typename Value>
  bool take(const std::string& arg, Value&& value) {
    if (arg == "--base") {
      base = value();
    } else if (arg == "--model") {
      model_dir = value();
    } else if (arg == "--config") {
      config = parse_config(value());
    } else {
      return false;
    }
    return true;
  }

  bool given() const { return base.empty() != model_dir.empty(); }

  // The model in eval mode: from config.json on the meta device and the folder's weights, or from --config and --base.
  lorafuse::models::LlamaForCausalLM load() const {
    lorafuse::models::LlamaForCausalLM model = nullptr;
    if (!model_dir.empty()) {  // the shape from config.json, a skeleton that costs nothing until the weights load
      const lorafuse::io::CheckpointReader folder(model_dir);
      auto c = lorafuse::models::LlamaConfig::from_hf_json(folder.config_json(), model_dir + "/config.json");
      c.tensor_options(c.tensor_options().device(at::kMeta));
      model = lorafuse::models::LlamaForCausalLM(c);
      lorafuse::load_checkpoint(*model, model_dir);
    } else {
      model = lorafuse::models::LlamaForCausalLM(config);
      load_weights(*model, base);
    }
    model->eval();
    return model;
  }
};

// The tensor `name` of a safetensors file (a ValueError naming both when it is missing).
inline at::Tensor read_tensor(const std::string& path, const std::string& name) {
  for (const auto& [key, t] : lorafuse::io::read_safetensors(path).tensors) {
    if (key == name) return t;
  }
  TORCH_CHECK_VALUE(false, path, ": no tensor \"", name, "\"");
}

}  // namespace lorafuse_example
