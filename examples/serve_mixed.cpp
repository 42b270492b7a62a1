// Serving many PEFT-format adapters from one frozen Llama in mixed batches: every forward carries rows of several
// adapters at once (lorafuse::AdapterScope with one adapter name per row: the base runs once for the whole batch,
// each row adds its own adapter), while another thread loads more adapters into the same model. Prints throughput
// beside running the same rows one adapter per forward, and checks that every row of the last mixed batch equals
// that row run alone with its adapter.
//
//   lorafuse_serve_mixed (--model MODEL_DIR | --base model.safetensors --config v,h,i,l,heads,kv_heads)
//                        --ids ids.safetensors [--out rows.safetensors] [--seconds S] [--late NAME=DIR ...]
//                        NAME=ADAPTER_DIR [NAME=ADAPTER_DIR ...]
//
// ids.safetensors holds "input_ids" (int64 [batch, tokens]): the requests, one per row. NAME=DIR adapters are
// served from the start; --late ones are loaded by a second thread while the first serves (each joins the rotation
// once loaded). Row i of step s runs served[(i + s) % n] where served = ["__base__", adapters loaded so far ...].
// --out gets, for the last mixed batch, one tensor per row "row<i>.<adapter name>" (its logits [tokens, vocab]).
#include <lorafuse/io/safetensors.h>
#include <lorafuse/peft/adapters.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "example_util.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

std::vector<std::string> row_names(const std::vector<std::string>& served, int64_t rows, int64_t step) {
  std::vector<std::string> names;
  for (int64_t i = 0; i < rows; ++i) names.push_back(served[static_cast<size_t>(i + step) % served.size()]);
  return names;
}

}  // namespace

int main(int argc, char** argv) try {
  lorafuse_example::ModelArgs model_args;
  std::string ids_path, out;
  double serve_seconds = 2.0;
  std::vector<std::pair<std::string, std::string>> adapters, late;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      TORCH_CHECK_VALUE(i + 1 < argc, arg, ": a value is missing");
      return argv[++i];
    };
    auto pair = [&](const std::string& text) {
      const auto eq = text.find('=');
      TORCH_CHECK_VALUE(eq != std::string::npos && eq > 0, "expected NAME=ADAPTER_DIR, found \"", text, "\"");
      return std::make_pair(text.substr(0, eq), text.substr(eq + 1));
    };
    if (model_args.take(arg, value)) continue;
    if (arg == "--ids") {
      ids_path = value();
    } else if (arg == "--out") {
      out = value();
    } else if (arg == "--seconds") {
      serve_seconds = std::stod(value());
    } else if (arg == "--late") {
      late.push_back(pair(value()));
    } else if (arg.find('=') != std::string::npos) {
      adapters.push_back(pair(arg));
    } else {
      TORCH_CHECK_VALUE(false, "unknown argument \"", arg, "\"; see the comment at the top of serve_mixed.cpp");
    }
  }
  TORCH_CHECK_VALUE(model_args.given() && !ids_path.empty() && !adapters.empty(),
                    "--ids, one of --model and --base, and at least one NAME=ADAPTER_DIR are required");

  lorafuse::models::LlamaForCausalLM model = model_args.load();
  for (const auto& [name, dir] : adapters) lorafuse::load_adapter(*model, dir, name);
  const at::Tensor ids = lorafuse_example::read_tensor(ids_path, "input_ids");
  const int64_t rows = ids.size(0);
  TORCH_CHECK_VALUE(ids.dim() == 2 && rows > 0, ids_path, ": input_ids: expected int64 [batch, tokens], found ",
                    ids.sizes());

  std::mutex served_mutex;
  std::vector<std::string> served = {"__base__"};
  for (const auto& a : adapters) served.push_back(a.first);
  auto snapshot = [&] {
    std::lock_guard<std::mutex> lock(served_mutex);
    return served;
  };

  // The loader: adds each late adapter while the main thread serves (load_adapter under a new name is safe beside
  // running forwards: <lorafuse/peft/adapters.h>), then lets it join the rotation.
  std::atomic<bool> loading_done{late.empty()};
  std::exception_ptr load_error;
  std::thread loader([&] {
    try {
      for (const auto& [name, dir] : late) {
        const auto start = Clock::now();
        lorafuse::load_adapter(*model, dir, name);
        std::printf("loaded %s while serving (%.1f ms)\n", name.c_str(), 1e3 * seconds_since(start));
        std::lock_guard<std::mutex> lock(served_mutex);
        served.push_back(name);
      }
    } catch (...) {
      load_error = std::current_exception();
    }
    loading_done = true;
  });

  torch::NoGradGuard no_grad;
  int64_t steps = 0, most_adapters = 0;
  const auto start = Clock::now();
  try {
    while (seconds_since(start) < serve_seconds || !loading_done) {
      const auto now_served = snapshot();
      lorafuse::AdapterScope scope(row_names(now_served, rows, steps));
      model->forward(ids);
      most_adapters = std::max<int64_t>(most_adapters, static_cast<int64_t>(now_served.size()));
      ++steps;
    }
  } catch (...) {
    loader.join();  // never leave the loader running on a model that is going away
    throw;
  }
  const double mixed_seconds = seconds_since(start);
  loader.join();
  if (load_error) std::rethrow_exception(load_error);

  // The last batch over every adapter: its throughput beside one forward per adapter (the rows split by adapter,
  // what serving without mixed batches does), and each row checked against running it alone.
  const auto all = snapshot();
  const auto names = row_names(all, rows, steps);
  auto time_it = [&](const std::function<void()>& fn) {
    std::vector<double> t;
    for (int rep = 0; rep < 5; ++rep) {
      const auto s = Clock::now();
      fn();
      t.push_back(seconds_since(s));
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  at::Tensor mixed;
  const double t_mixed = time_it([&] {
    lorafuse::AdapterScope scope(names);
    mixed = model->forward(ids);
  });
  std::vector<at::Tensor> alone(static_cast<size_t>(rows));
  const double t_split = time_it([&] {
    for (const auto& name : all) {
      std::vector<int64_t> mine;
      for (int64_t i = 0; i < rows; ++i) {
        if (names[static_cast<size_t>(i)] == name) mine.push_back(i);
      }
      if (mine.empty()) continue;
      lorafuse::AdapterScope scope(name == "__base__" ? "" : name);
      const at::Tensor index = at::tensor(mine, at::kLong);
      const at::Tensor part = model->forward(ids.index_select(0, index));
      for (size_t j = 0; j < mine.size(); ++j) alone[static_cast<size_t>(mine[j])] = part[static_cast<int64_t>(j)];
    }
  });
  double worst = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    worst = std::max(worst, (mixed[i] - alone[static_cast<size_t>(i)]).abs().max().item<double>());
  }
  const double tokens = static_cast<double>(ids.numel());
  std::printf(
      "served %lld mixed batches of %lld rows in %.2f s: %.0f tokens/s, up to %lld adapters per batch "
      "(with the base)\n",
      static_cast<long long>(steps), static_cast<long long>(rows), mixed_seconds,
      tokens * static_cast<double>(steps) / mixed_seconds, static_cast<long long>(most_adapters));
  std::printf("last batch, %zu adapters: mixed %.0f tokens/s, one forward per adapter %.0f tokens/s (%.2fx)\n",
              all.size(), tokens / t_mixed, tokens / t_split, t_split / t_mixed);
  std::printf("rows against each row run alone: max abs difference %.3g\n", worst);
  if (!out.empty()) {
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (int64_t i = 0; i < rows; ++i) tensors.emplace_back("row" + std::to_string(i) + "." + names[i], mixed[i]);
    lorafuse::io::write_safetensors(out, tensors);
  }
  if (!(worst <= 1e-4)) {
    std::cerr << "lorafuse_serve_mixed: a mixed-batch row differs from that row run alone by " << worst << "\n";
    return 1;
  }
  return 0;
} catch (const c10::Error& e) {
  std::cerr << "lorafuse_serve_mixed: " << e.what_without_backtrace() << "\n";
  return 1;
} catch (const std::exception& e) {
  std::cerr << "lorafuse_serve_mixed: " << e.what() << "\n";
  return 1;
}
