// Fine-tuning a Llama with LoRA adapters from C++, start to finish:
//
//   1. pre-train a small byte-level Llama on task A (full fine-tuning: every weight trains);
//   2. inject LoRA into q_proj and v_proj (only the adapter trains from here on);
//   3. fine-tune adapter "task_b" on task B and watch its held-out loss fall;
//   4. add a second adapter "task_c", train it on task C, and switch between the two at run time;
//   5. generate text greedily with the base model and with each adapter;
//   6. merge the adapter into the base weights, unmerge it, and finally merge_and_unload.
//
// Every stage also checks what it shows (the adapters differ, disabling them gives the base model back,
// merging changes no output...), so this program doubles as a test: it prints "all checks passed" and
// returns 0, or names the failed checks and returns 1.
//
//   lorafuse_finetune_llama [--device cpu|cuda] [--data DIR] [--steps N] [--ft-steps N]

#include <lorafuse/config/lora_config.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/ops.h>
#include <lorafuse/peft/inject.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifndef LORAFUSE_EXAMPLE_DATA_DIR
#define LORAFUSE_EXAMPLE_DATA_DIR "examples/data"
#endif

namespace {

using lorafuse::models::Llama;
using torch::Tensor;
using Clock = std::chrono::steady_clock;

constexpr int64_t kVocab = 256;  // byte-level: every byte is a token, no tokenizer needed

struct Args {
  torch::Device device = torch::kCPU;
  std::string data_dir = LORAFUSE_EXAMPLE_DATA_DIR;
  int pretrain_steps = 300;
  int finetune_steps = 200;
  int64_t batch = 16;
  int64_t seq_len = 64;
};

// ---- checks: each one is printed; main's exit status says whether any failed -----------------------
struct Checks {
  std::vector<std::string> failed;
  void operator()(bool ok, const std::string& what) {
    std::cout << (ok ? "  [ok]     " : "  [FAILED] ") << what << "\n";
    if (!ok) failed.push_back(what);
  }
};

std::string fmt(const char* format, double value) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, value);
  return buf;
}

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// ---- data: a text file as a 1-D tensor of bytes, its last 10% held out for evaluation --------------
struct Corpus {
  std::string name;
  Tensor train;  // [N] int64 on the device
  Tensor eval;   // [M] int64 on the device
};

Corpus load_corpus(const std::string& dir, const std::string& name, torch::Device device) {
  const std::string path = dir + "/" + name + ".txt";
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path + " (pass --data DIR)");
  std::ostringstream text;
  text << in.rdbuf();
  const std::string bytes = text.str();
  std::vector<int64_t> ids(bytes.begin(), bytes.end());
  for (auto& id : ids) id &= 0xFF;  // char may be signed
  Tensor all = torch::tensor(ids, torch::kLong).to(device);
  const int64_t n_eval = static_cast<int64_t>(ids.size()) / 10;
  const int64_t n_train = static_cast<int64_t>(ids.size()) - n_eval;
  std::cout << "  " << name << ": " << ids.size() << " bytes (" << n_train << " train, " << n_eval << " held out)\n";
  return {name, all.slice(0, 0, n_train), all.slice(0, n_train)};
}

// Next-byte prediction: inputs are windows of the text, targets the same windows shifted by one byte.
std::pair<Tensor, Tensor> windows(const Tensor& data, const Tensor& starts, int64_t seq_len) {
  const Tensor idx = starts.to(data.device()).unsqueeze(1) + torch::arange(seq_len + 1, data.options());
  const Tensor w = data.index({idx});  // [B, seq_len + 1]
  return {w.slice(1, 0, seq_len), w.slice(1, 1)};
}

// B random windows (drawn on the CPU generator, so a run is the same on every device).
std::pair<Tensor, Tensor> random_batch(const Tensor& data, int64_t batch, int64_t seq_len) {
  return windows(data, torch::randint(data.size(0) - seq_len - 1, {batch}, torch::kLong), seq_len);
}

// Every non-overlapping window of the held-out text, in order: the same batch each time.
std::pair<Tensor, Tensor> eval_batch(const Tensor& data, int64_t seq_len) {
  const int64_t n = (data.size(0) - 1) / seq_len;
  return windows(data, torch::arange(n, torch::kLong) * seq_len, seq_len);
}

Tensor next_byte_loss(Llama& model, const Tensor& inputs, const Tensor& targets) {
  const Tensor logits = model->forward(inputs);  // [B, T, vocab]
  return torch::nn::functional::cross_entropy(logits.reshape({-1, kVocab}), targets.reshape({-1}));
}

// Mean next-byte loss on the held-out text, in eval mode (no LoRA dropout) and without autograd.
double eval_loss(Llama& model, const Corpus& corpus, int64_t seq_len) {
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard no_grad;
  const auto [inputs, targets] = eval_batch(corpus.eval, seq_len);
  const double loss = next_byte_loss(model, inputs, targets).item<double>();
  model->train(was_training);
  return loss;
}

// Logits for a fixed probe batch, in eval mode: what the later comparisons compare.
Tensor probe_logits(Llama& model, const Tensor& probe) {
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard no_grad;
  Tensor logits = model->forward(probe);
  model->train(was_training);
  return logits;
}

double max_abs_diff(const Tensor& a, const Tensor& b) { return (a - b).abs().max().item<double>(); }

// The training loop, shared by pre-training (all parameters) and LoRA fine-tuning (the adapter's only):
// AdamW, gradients clipped to norm 1, the learning rate decaying linearly from `lr` to lr/10.
void train(Llama& model, const std::vector<Tensor>& params, const Corpus& corpus, const Args& args, int steps,
           double lr, double weight_decay) {
  torch::optim::AdamW optimizer(params, torch::optim::AdamWOptions(lr).weight_decay(weight_decay));
  model->train();
  const int every = std::max(1, steps / 5);
  double loss_sum = 0.0;
  auto interval_start = Clock::now();
  for (int step = 1; step <= steps; ++step) {
    const double lr_now = lr * (1.0 - 0.9 * (step - 1) / steps);
    for (auto& group : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr_now);
    const auto [inputs, targets] = random_batch(corpus.train, args.batch, args.seq_len);
    optimizer.zero_grad();
    Tensor loss = next_byte_loss(model, inputs, targets);
    loss.backward();
    torch::nn::utils::clip_grad_norm_(params, 1.0);
    optimizer.step();
    loss_sum += loss.item<double>();
    if (step % every == 0 || step == steps) {
      const int n = step % every == 0 ? every : step % every;
      const double tokens_per_s = static_cast<double>(n * args.batch * args.seq_len) / seconds_since(interval_start);
      std::printf("  step %3d/%d  loss %.3f  tokens/s %.0f\n", step, steps, loss_sum / n, tokens_per_s);
      std::fflush(stdout);
      loss_sum = 0.0;
      interval_start = Clock::now();
    }
  }
}

std::vector<Tensor> trainable(torch::nn::Module& model) {
  std::vector<Tensor> params;
  for (const auto& p : model.parameters()) {
    if (p.requires_grad()) params.push_back(p);
  }
  return params;
}

// Whether exactly the A and B matrices of `adapter` require grad, and nothing else.
bool only_adapter_trains(torch::nn::Module& model, const std::string& adapter) {
  int64_t n_lora = 0;
  for (const auto& p : model.named_parameters()) {
    const std::string& name = p.key();
    const bool is_adapter = name.find(".lora_A." + adapter + ".") != std::string::npos ||
                            name.find(".lora_B." + adapter + ".") != std::string::npos;
    if (p.value().requires_grad() != is_adapter) {
      std::cout << "  " << name << ": requires_grad=" << p.value().requires_grad() << "\n";
      return false;
    }
    n_lora += is_adapter;
  }
  return n_lora > 0;
}

// Greedy decoding, one byte at a time. There is no KV cache: each step re-runs the last `context` bytes
// (the window length the model was trained on: rotary positions beyond it were never seen).
std::string generate(Llama& model, const std::string& prompt, int n_bytes, int64_t context, torch::Device device) {
  model->eval();
  torch::NoGradGuard no_grad;
  std::vector<int64_t> ids;
  for (unsigned char c : prompt) ids.push_back(c);
  std::string out;
  for (int i = 0; i < n_bytes; ++i) {
    const auto first = ids.size() > static_cast<size_t>(context) ? ids.end() - context : ids.begin();
    const Tensor input = torch::tensor(std::vector<int64_t>(first, ids.end()), torch::kLong).to(device).unsqueeze(0);
    const int64_t next = model->forward(input)[0][-1].argmax().item<int64_t>();
    ids.push_back(next);
    out.push_back(static_cast<char>(next));
  }
  return out;
}

// Newlines as \n and anything outside printable ASCII as \xNN, so the output stays on one line.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') {
      out += "\\n";
    } else if (c >= 32 && c < 127) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02X", c);
      out += buf;
    }
  }
  return out;
}

// ---- the walk-through -------------------------------------------------------------------------------
int run(const Args& args) {
  const auto start = Clock::now();
  torch::manual_seed(0);
  Checks check;
  std::cout << "lorafuse fine-tuning example on " << args.device << " (" << torch::get_num_threads()
            << " CPU threads)\n\ndata from " << args.data_dir << ":\n";
  const Corpus task_a = load_corpus(args.data_dir, "task_a", args.device);
  const Corpus task_b = load_corpus(args.data_dir, "task_b", args.device);
  const Corpus task_c = load_corpus(args.data_dir, "task_c", args.device);
  const Tensor probe = eval_batch(task_b.eval, args.seq_len).first.slice(0, 0, 4);  // [4, T]

  // 1. A small Llama whose module paths are Hugging Face's (model.layers.0.self_attn.q_proj, ...),
  //    pre-trained on task A. Every parameter trains here.
  auto config = lorafuse::models::LlamaConfig()
                    .vocab_size(kVocab)
                    .hidden_size(128)
                    .intermediate_size(344)
                    .num_hidden_layers(2)
                    .num_attention_heads(4)
                    .num_key_value_heads(2)
                    .tensor_options(torch::TensorOptions().device(args.device).dtype(torch::kFloat));
  Llama model(config);
  const auto base_count = lorafuse::trainable_parameters(*model);
  std::cout << "\n== 1. pre-training a " << base_count.total << "-parameter Llama on task_a (full fine-tuning)\n";
  train(model, model->parameters(), task_a, args, args.pretrain_steps, 3e-3, 0.01);
  const double base_loss_a = eval_loss(model, task_a, args.seq_len);
  const double base_loss_b = eval_loss(model, task_b, args.seq_len);
  const double base_loss_c = eval_loss(model, task_c, args.seq_len);
  std::printf("  held-out loss of the base model: task_a %.3f  task_b %.3f  task_c %.3f\n", base_loss_a, base_loss_b,
              base_loss_c);
  const Tensor base_logits = probe_logits(model, probe);

  // 2. LoRA into q_proj and v_proj of every layer, with PEFT's config names. The base freezes; only
  //    the adapter's A [r, in] and B [out, r] train. B starts at zero, so the model is still the base.
  std::cout << "\n== 2. inject_lora: adapter \"task_b\" into q_proj and v_proj\n";
  lorafuse::LoraConfig lora_config;
  lora_config.r(8).lora_alpha(16).lora_dropout(0.05);
  lora_config.target_modules({"q_proj", "v_proj"});  // a name matches every path ending in ".q_proj"
  const auto report = lorafuse::inject_lora(*model, lora_config, "task_b");
  std::cout << "  wrapped " << report.wrapped.size() << " layers:\n";
  for (const auto& path : report.wrapped) std::cout << "    " << path << "\n";
  const auto layers = lorafuse::lora_layers(*model);  // (path, nn::LoraLayer*) in module order
  std::cout << "  " << layers.front().first << " is now " << layers.front().second->module() << "\n  ";
  lorafuse::print_trainable_parameters(*model);
  std::cout << "  trainable " << report.trainable << " of " << report.total << " parameters\n";
  check(report.wrapped.size() == 2 * static_cast<size_t>(config.num_hidden_layers()),
        "every q_proj and v_proj was wrapped");
  check(only_adapter_trains(*model, "task_b"), "only task_b's lora_A/lora_B require grad");
  // The adapted layers now run lorafuse's fused kernel instead of torch::nn::Linear; with B = 0 the
  // LoRA term is exactly zero, so only the base GEMM's rounding may differ.
  const double fresh_diff = max_abs_diff(probe_logits(model, probe), base_logits);
  const double fresh_tolerance = 1e-5 * std::max(1.0, base_logits.abs().max().item<double>());
  check(fresh_diff <= fresh_tolerance,
        "a fresh adapter (B = 0) leaves the output as it was: max |diff| " + fmt("%.2e", fresh_diff));

  // 3. Fine-tune the adapter on task B. The optimizer gets the trainable parameters only.
  std::cout << "\n== 3. fine-tuning adapter task_b on task_b (" << args.finetune_steps << " steps)\n";
  train(model, trainable(*model), task_b, args, args.finetune_steps, 2e-2, 0.0);
  const double tuned_loss_b = eval_loss(model, task_b, args.seq_len);
  std::printf("  held-out task_b loss: %.3f before, %.3f after\n", base_loss_b, tuned_loss_b);
  check(tuned_loss_b < base_loss_b, "fine-tuning lowered the held-out task_b loss");

  // 4. A second adapter beside the first. add_adapter leaves "task_b" active; set_adapter switches (no
  //    data moves), and only the active adapter trains.
  std::cout << "\n== 4. second adapter task_c, trained on task_c (" << args.finetune_steps << " steps)\n";
  lorafuse::add_adapter(*model, "task_c", lora_config);
  lorafuse::set_adapter(*model, "task_c");
  check(only_adapter_trains(*model, "task_c"), "after set_adapter(task_c) only task_c's weights require grad");
  train(model, trainable(*model), task_c, args, args.finetune_steps, 2e-2, 0.0);

  struct Row {
    std::string adapter;
    double loss_b, loss_c;
    Tensor logits;
  };
  std::vector<Row> rows;
  for (const std::string adapter : {"task_b", "task_c"}) {
    lorafuse::set_adapter(*model, adapter);
    rows.push_back({"adapter " + adapter, eval_loss(model, task_b, args.seq_len),
                    eval_loss(model, task_c, args.seq_len), probe_logits(model, probe)});
  }
  lorafuse::disable_adapters(*model);  // every LoraLinear runs its base torch::nn::Linear alone
  rows.push_back({"adapters disabled", eval_loss(model, task_b, args.seq_len), eval_loss(model, task_c, args.seq_len),
                  probe_logits(model, probe)});
  lorafuse::enable_adapters(*model);
  std::printf("  %-20s %8s %8s\n", "held-out loss", "task_b", "task_c");
  for (const auto& row : rows) std::printf("  %-20s %8.3f %8.3f\n", row.adapter.c_str(), row.loss_b, row.loss_c);
  check(rows[0].loss_b < rows[1].loss_b, "on task_b, adapter task_b beats adapter task_c");
  check(rows[1].loss_c < rows[0].loss_c, "on task_c, adapter task_c beats adapter task_b");
  const double adapters_diff = max_abs_diff(rows[0].logits, rows[1].logits);
  check(adapters_diff > 1e-2, "the two adapters give different logits: max |diff| " + fmt("%.3f", adapters_diff));
  // Disabled layers call the very same torch::nn::Linear on the very same weights as before injection,
  // so the logits are identical bit for bit, not just close.
  check(torch::equal(rows[2].logits, base_logits), "adapters disabled: logits equal the base model's bit for bit");

  // 5. Greedy samples: the same prompts through the base model and each adapter. Each adapter pulls any
  //    prompt towards its own task's format; a model this small, trained for seconds, learns a task's
  //    format and vocabulary long before its facts.
  std::cout << "\n== 5. greedy generation, 60 bytes\n";
  for (const std::string prompt : {"In the evening, the ", "Q: What color is grass? A:", "Day 12. Wind "}) {
    std::cout << "  prompt \"" << printable(prompt) << "\"\n";
    for (const std::string adapter : {"base", "task_b", "task_c"}) {
      if (adapter == "base") {
        lorafuse::disable_adapters(*model);
      } else {
        lorafuse::enable_adapters(*model);
        lorafuse::set_adapter(*model, adapter);
      }
      std::printf("    %-7s | %s\n", adapter.c_str(),
                  printable(generate(model, prompt, 60, args.seq_len, args.device)).c_str());
    }
  }
  lorafuse::enable_adapters(*model);

  // 6. Merging: W += scale * B * A, so inference costs what the base costs. unmerge restores the saved
  //    weight exactly; merge_and_unload makes it permanent and puts plain Linear layers back.
  std::cout << "\n== 6. merge_adapter / unmerge_adapter / merge_and_unload (adapter task_b)\n";
  lorafuse::set_adapter(*model, "task_b");
  const Tensor adapted = probe_logits(model, probe);
  // Merged, the same sums are rounded in another order (W + scale*B*A first): fp32 agreement to about 1e-5
  // of the logits' magnitude is what to expect, far below the adapter's own effect (> 1 here).
  const double tolerance = 1e-5 * std::max(1.0, adapted.abs().max().item<double>());
  std::vector<Tensor> weights_before;
  bool b_nonzero = true;
  for (auto& [path, layer] : lorafuse::lora_layers(*model)) {
    weights_before.push_back(layer->module().as<lorafuse::nn::LoraLinear>()->base_layer->weight.detach().clone());
    b_nonzero = b_nonzero && layer->lora_b("task_b").abs().max().item<double>() > 0;
  }
  check(b_nonzero, "task_b's B matrices are non-zero, so merging has something to change");

  lorafuse::merge_adapter(*model);
  const double merged_diff = max_abs_diff(probe_logits(model, probe), adapted);
  bool weights_changed = true;
  {
    size_t i = 0;
    for (auto& [path, layer] : lorafuse::lora_layers(*model)) {
      weights_changed =
          weights_changed && layer->merged() &&
          !torch::equal(layer->module().as<lorafuse::nn::LoraLinear>()->base_layer->weight, weights_before[i++]);
    }
  }
  check(weights_changed, "merge_adapter changed every adapted base weight");
  check(merged_diff <= tolerance, "merged output equals the adapter's output: max |diff| " + fmt("%.2e", merged_diff) +
                                      " (tolerance " + fmt("%.1e", tolerance) + ")");

  lorafuse::unmerge_adapter(*model);
  bool restored = true;
  {
    size_t i = 0;
    for (auto& [path, layer] : lorafuse::lora_layers(*model)) {
      restored = restored && !layer->merged() &&
                 torch::equal(layer->module().as<lorafuse::nn::LoraLinear>()->base_layer->weight, weights_before[i++]);
    }
  }
  check(restored, "unmerge_adapter restored every base weight bit for bit");

  lorafuse::merge_and_unload(*model);
  const double unloaded_diff = max_abs_diff(probe_logits(model, probe), adapted);
  const auto unloaded_count = lorafuse::trainable_parameters(*model);
  check(lorafuse::lora_layers(*model).empty(), "merge_and_unload left no LoraLinear in the model");
  check(unloaded_count.total == base_count.total,
        "the model has its base size again: " + std::to_string(unloaded_count.total) + " parameters");
  check(unloaded_diff <= tolerance,
        "merged-and-unloaded output equals the adapter's output: max |diff| " + fmt("%.2e", unloaded_diff));

  std::printf("\ntotal time %.1f s\n", seconds_since(start));
  if (!check.failed.empty()) {
    std::cout << check.failed.size() << " check(s) FAILED:\n";
    for (const auto& what : check.failed) std::cout << "  " << what << "\n";
    return 1;
  }
  std::cout << "all checks passed\n";
  return 0;
}

void usage(std::ostream& out) {
  const Args defaults;
  out << "usage: lorafuse_finetune_llama [--device cpu|cuda] [--data DIR] [--steps N] [--ft-steps N]\n"
      << "  --device    cpu or cuda (default: cuda if a GPU is visible and lorafuse has CUDA kernels)\n"
      << "  --data      directory with task_a.txt, task_b.txt and task_c.txt (default: " << defaults.data_dir << ")\n"
      << "  --steps     pre-training steps on task_a (default " << defaults.pretrain_steps << ")\n"
      << "  --ft-steps  fine-tuning steps for each adapter (default " << defaults.finetune_steps << ")\n";
}

// Returns false (after printing why) when the command line is not understood.
bool parse_args(int argc, char** argv, Args& args) {
  args.device = torch::cuda::is_available() && lorafuse::has_cuda_kernels() ? torch::kCUDA : torch::kCPU;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      usage(std::cout);
      std::exit(0);
    }
    if (i + 1 >= argc) {
      std::cerr << "missing value after " << flag << "\n";
      return false;
    }
    const std::string value = argv[++i];
    if (flag == "--device") {
      if (value != "cpu" && value != "cuda") {
        std::cerr << "--device: expected cpu or cuda, found " << value << "\n";
        return false;
      }
      args.device = value == "cuda" ? torch::kCUDA : torch::kCPU;
    } else if (flag == "--data") {
      args.data_dir = value;
    } else if (flag == "--steps" || flag == "--ft-steps") {
      const int n = std::atoi(value.c_str());
      if (n <= 0) {
        std::cerr << flag << ": expected a positive number of steps, found " << value << "\n";
        return false;
      }
      (flag == "--steps" ? args.pretrain_steps : args.finetune_steps) = n;
    } else {
      std::cerr << "unknown option " << flag << "\n";
      return false;
    }
  }
  if (args.device.is_cuda() && !torch::cuda::is_available()) {
    std::cerr << "--device cuda: no CUDA device is visible\n";
    return false;
  }
  if (args.device.is_cuda() && !lorafuse::has_cuda_kernels()) {
    std::cerr << "--device cuda: this build of lorafuse has no CUDA kernels (configure with LORAFUSE_CUDA=1)\n";
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args args;
    if (!parse_args(argc, argv, args)) {
      usage(std::cerr);
      return 2;
    }
    return run(args);
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 1;
}
