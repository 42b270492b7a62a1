// Serving one frozen Llama with several PEFT-format adapters from C++: load the base model, load each adapter
// folder (saved by PEFT or by lorafuse) under its name, and run every adapter on the same tokens, each in
// its own thread through lorafuse::AdapterScope.
//
//   lorafuse_llama_adapters --model MODEL_DIR --ids ids.safetensors --out logits.safetensors
//                           NAME=ADAPTER_DIR [NAME=ADAPTER_DIR ...]
//   lorafuse_llama_adapters --base model.safetensors [--config vocab,hidden,intermediate,layers,heads,kv_heads] ...
//
// --model: a Hugging Face checkpoint folder (config.json and model.safetensors or its shards, 4-bit layers
// included), e.g. a transformers save_pretrained folder or lorafuse.pretrained.smollm2_folder(): the model is built
// from config.json on the meta device and takes the folder's weights (lorafuse::load_checkpoint). --base: one
// safetensors file with Hugging Face's parameter names and the shape given by --config.
//
// ids.safetensors holds "input_ids" (int64 [batch, tokens]). logits.safetensors gets "base" (adapters
// off) and one tensor per adapter name.
#include <lorafuse/io/checkpoint.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/peft/adapters.h>
#include <lorafuse/quant/checkpoint.h>
#include <torch/torch.h>

#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

// Copies every parameter of `module` from the file's tensor of the same name (all must be there).
void load_weights(torch::nn::Module& module, const std::string& path) {
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

lorafuse::models::LlamaConfig parse_config(const std::string& text) {
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

}  // namespace

int main(int argc, char** argv) try {
  std::string base, model_dir, ids_path, out;
  lorafuse::models::LlamaConfig config;
  std::vector<std::pair<std::string, std::string>> adapters;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      TORCH_CHECK_VALUE(i + 1 < argc, arg, ": a value is missing");
      return argv[++i];
    };
    if (arg == "--base") {
      base = value();
    } else if (arg == "--model") {
      model_dir = value();
    } else if (arg == "--ids") {
      ids_path = value();
    } else if (arg == "--out") {
      out = value();
    } else if (arg == "--config") {
      config = parse_config(value());
    } else if (arg.find('=') != std::string::npos) {
      adapters.emplace_back(arg.substr(0, arg.find('=')), arg.substr(arg.find('=') + 1));
    } else {
      TORCH_CHECK_VALUE(false, "unknown argument \"", arg, "\"; see the comment at the top of llama_adapters.cpp");
    }
  }
  TORCH_CHECK_VALUE(base.empty() != model_dir.empty() && !ids_path.empty() && !out.empty(),
                    "--ids, --out and one of --model and --base are required");

  lorafuse::models::LlamaForCausalLM model = nullptr;
  if (!model_dir.empty()) {  // the shape from config.json, a skeleton that costs nothing until the weights load
    const lorafuse::io::CheckpointReader folder(model_dir);
    config = lorafuse::models::LlamaConfig::from_hf_json(folder.config_json(), model_dir + "/config.json");
    config.tensor_options(config.tensor_options().device(at::kMeta));
    model = lorafuse::models::LlamaForCausalLM(config);
    lorafuse::load_checkpoint(*model, model_dir);
  } else {
    model = lorafuse::models::LlamaForCausalLM(config);
    load_weights(*model, base);
  }
  model->eval();
  for (const auto& [name, dir] : adapters) {
    const auto report = lorafuse::load_adapter(*model, dir, name);
    std::cout << "adapter " << name << ": " << report.targets.size() << " layers from " << dir << "\n";
  }
  const auto ids_file = lorafuse::io::read_safetensors(ids_path);
  at::Tensor ids;
  for (const auto& [name, t] : ids_file.tensors) {
    if (name == "input_ids") ids = t;
  }
  TORCH_CHECK_VALUE(ids.defined(), ids_path, ": no tensor \"input_ids\"");

  // One thread per adapter, all on the same model at once.
  std::vector<std::pair<std::string, at::Tensor>> logits(adapters.size() + 1);
  std::vector<std::thread> threads;
  for (size_t i = 0; i <= adapters.size(); ++i) {
    threads.emplace_back([&, i] {
      torch::NoGradGuard no_grad;  // grad mode is per thread
      const std::string name = i == 0 ? "" : adapters[i - 1].first;
      lorafuse::AdapterScope scope(name);
      logits[i] = {i == 0 ? "base" : name, model->forward(ids)};
    });
  }
  for (auto& t : threads) t.join();
  lorafuse::io::write_safetensors(out, logits);
  lorafuse::print_trainable_parameters(*model);
  return 0;
} catch (const c10::Error& e) {
  std::cerr << "lorafuse_llama_adapters: " << e.what_without_backtrace() << "\n";
  return 1;
}
