// lorafuse::lq_lora (<lorafuse/peft/lq_lora.h>) on the reference Llama from LibTorch: the budget met, the targeted
// layers quantized in their chosen formats with an adapter starting at L1·L2 (each layer's Q + s·B·A recomputes the
// reported error), training that moves only the adapter, errors that leave the model unchanged.
#include <ATen/ATen.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/nn/lora_linear4bit.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/peft/lq_lora.h>
#include <torch/optim/adamw.h>

#include <numeric>

#include "catch.h"
#include "models/llama_test_util.h"
#include "nn/nn_test_util.h"

using lorafuse_test::require_error_parts;

TEST_CASE("lq_lora on the reference Llama", "[peft][lq_lora]") {
  auto model = lorafuse_test::tiny_llama_nf4();
  model->eval();
  std::map<std::string, at::Tensor> original;
  for (const auto& p : model->named_parameters()) {
    if (p.key().find("_proj.weight") != std::string::npos) original[p.key()] = p.value().detach().clone();
  }
  const auto config = lorafuse::LqLoraConfig().budget_bits(3.0).r(8).lora_alpha(16);
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::lq_lora(*model, lorafuse::LqLoraConfig(config).budget_bits(1.0)); },
      {"budget_bits: 1 is below the smallest configuration's 2.127"});
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::lq_lora(*model, config, lorafuse::LoraConfig().target_modules("all-linear"), "default",
                          {{"nowhere", at::ones({2, 2})}});
      },
      {"lq_lora: fisher: \"nowhere\" is not a targeted Linear layer"});
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::lq_lora(*model, config, lorafuse::LoraConfig().target_modules("all-linear").use_rslora(true)); },
      {"lq_lora: targets: use_rslora: LQ-LoRA's adapter is scaled by lora_alpha / r"});
  CHECK(lorafuse::lora_layers(*model).empty());  // unchanged by the errors

  const lorafuse::LqPlan plan = lorafuse::lq_lora(*model, config);
  REQUIRE(plan.matrices.size() == 14);
  CHECK(plan.average_bits <= 3.0 + 1e-9);
  REQUIRE(plan.allocation.has_value());
  CHECK(plan.allocation->optimal);
  const auto layers = lorafuse::lora_layers(*model);
  REQUIRE(layers.size() == 14);
  for (const auto& [path, layer] : layers) {
    const auto* q = layer->module().as<lorafuse::nn::LoraLinear4bitImpl>();
    REQUIRE(q != nullptr);
    const auto& base = *q->base_layer;
    const auto& row = *std::find_if(plan.matrices.begin(), plan.matrices.end(),
                                    [&](const lorafuse::LqMatrixPlan& m) { return m.name == path; });
    CHECK(base.options.format() == row.config.format);
    const at::Tensor w = base.dequantized_weight(at::kFloat) +
                         2.0 * at::mm(layer->lora_b("default"), layer->lora_a("default"));  // s = 16 / 8
    const at::Tensor& w0 = original.at(path + ".weight");
    CHECK(((w - w0).norm() / w0.norm()).item<double>() == Approx(row.relative_error).epsilon(1e-4).margin(1e-6));
  }
  // training moves only the adapters
  std::vector<at::Tensor> trainable;
  for (const auto& p : model->parameters()) {
    if (p.requires_grad()) trainable.push_back(p);
  }
  CHECK(trainable.size() == 28);
  const auto packed = model->named_buffers()["model.layers.0.mlp.up_proj.base_layer.packed"].clone();
  torch::optim::AdamW opt(trainable, torch::optim::AdamWOptions(1e-2));
  model->train();
  const at::Tensor ids = lorafuse_test::llama_ids();
  const auto loss = [&] {
    const at::Tensor logits = model->forward(ids);
    return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), ids.reshape({-1}));
  };
  const double first = loss().item<double>();
  for (int step = 0; step < 6; ++step) {
    opt.zero_grad();
    loss().backward();
    opt.step();
  }
  CHECK(loss().item<double>() < first);
  CHECK(at::equal(packed, model->named_buffers()["model.layers.0.mlp.up_proj.base_layer.packed"]));
}

TEST_CASE("lq_plan decomposes matrices on several threads as on one", "[peft][lq_lora]") {
  at::manual_seed(11);
  std::vector<lorafuse::LqMatrix> matrices;
  for (int i = 0; i < 5; ++i) matrices.push_back({"m" + std::to_string(i), at::randn({48 + 16 * i, 64}), {}});
  const auto config = lorafuse::LqLoraConfig().budget_bits(3.0).r(4).max_iters(3);
  std::vector<int64_t> seen;
  const lorafuse::LqProgress record = [&](const std::string& stage, int64_t done, int64_t total) {
    if (stage == "cost") seen.push_back(done);
    CHECK(done <= total);
  };
  const auto one = lorafuse::lq_plan(matrices, lorafuse::LqLoraConfig(config).threads(1));
  const auto two = lorafuse::lq_plan(matrices, lorafuse::LqLoraConfig(config).threads(2), record);
  REQUIRE(one.matrices.size() == two.matrices.size());
  CHECK(one.allocation->choice == two.allocation->choice);
  for (size_t i = 0; i < one.matrices.size(); ++i) {
    CHECK(two.matrices[i].name == one.matrices[i].name);  // in the input's order
    // the same decomposition up to rounding: one worker runs its BLAS calls multi-threaded, two run them
    // single-threaded, and MKL's sums then round differently on some CPUs (AMD EPYC), which the iterations carry on
    CHECK(two.matrices[i].error == Approx(one.matrices[i].error).epsilon(2e-2));
    for (size_t c = 0; c < one.cost[i].size(); ++c) CHECK(two.cost[i][c] == Approx(one.cost[i][c]).epsilon(2e-2));
  }
  // progress counted once per task, in order, whichever thread finished it
  std::vector<int64_t> want(5 * config.configs().size());
  std::iota(want.begin(), want.end(), 1);
  CHECK(seen == want);
  // an error in one task (here the progress callback's) stops the plan and reaches the caller
  const lorafuse::LqProgress failing = [](const std::string&, int64_t done, int64_t) {
    TORCH_CHECK_VALUE(done < 7, "stop at 7");
  };
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::lq_plan(matrices, lorafuse::LqLoraConfig(config).threads(2), failing); }, {"stop at 7"});
  require_error_parts<c10::ValueError>([&] { lorafuse::LqLoraConfig(config).threads(-1).validate(); },
                                       {"LqLoraConfig: threads: expected >= 0", "found -1"});
}
