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
#include <lorafuse/io/safetensors.h>
#include <lorafuse/peft/adapters.h>
#include <torch/torch.h>

#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "example_util.h"

int main(int argc, char** argv) try {
  lorafuse_example::ModelArgs model_args;
  std::string ids_path, out;
  std::vector<std::pair<std::string, std::string>> adapters;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      TORCH_CHECK_VALUE(i + 1 < argc, arg, ": a value is missing");
      return argv[++i];
    };
    if (model_args.take(arg, value)) continue;
    if (arg == "--ids") {
      ids_path = value();
    } else if (arg == "--out") {
      out = value();
    } else if (arg.find('=') != std::string::npos) {
      adapters.emplace_back(arg.substr(0, arg.find('=')), arg.substr(arg.find('=') + 1));
    } else {
      TORCH_CHECK_VALUE(false, "unknown argument \"", arg, "\"; see the comment at the top of llama_adapters.cpp");
    }
  }
  TORCH_CHECK_VALUE(model_args.given() && !ids_path.empty() && !out.empty(),
                    "--ids, --out and one of --model and --base are required");

  lorafuse::models::LlamaForCausalLM model = model_args.load();
  for (const auto& [name, dir] : adapters) {
    const auto report = lorafuse::load_adapter(*model, dir, name);
    std::cout << "adapter " << name << ": " << report.targets.size() << " layers from " << dir << "\n";
  }
  const at::Tensor ids = lorafuse_example::read_tensor(ids_path, "input_ids");

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
