// Runs lora_linear and the LoRA modules through an installed lorafuse: the op against the plain formula,
// and a meta-device Llama 2 7B injected with LoRA and counted (its installed headers must be complete).
#include <ATen/ATen.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/ops.h>

#include <cstdio>

int main() {
  at::manual_seed(0);
  const auto x = at::randn({5, 16}), w = at::randn({8, 16}), b = at::randn({8});
  const auto a = at::randn({4, 16}), bb = at::randn({8, 4});
  const auto y = lorafuse::lora_linear(x, w, b, a, bb, 0.5, 0.0);
  const auto ref = at::addmm(b, x, w.t()) + 0.5 * at::mm(at::mm(x, a.t()), bb.t());
  const double err = (y - ref).abs().max().item<double>();
  std::printf("consumer: max |lorafuse - reference| = %g\n", err);

  lorafuse::models::Llama model(lorafuse::models::LlamaConfig::llama2_7b().tensor_options(at::kMeta));
  lorafuse::inject_lora(*model, lorafuse::LoraConfig().r(8).lora_alpha(16));
  const auto count = lorafuse::trainable_parameters(*model);
  std::printf("consumer: %s\n", count.str().c_str());
  return err < 1e-4 && count.trainable == 4194304 ? 0 : 1;
}
