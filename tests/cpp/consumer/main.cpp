// Runs lora_linear through an installed lorafuse and checks it against the plain formula.
#include <ATen/ATen.h>
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
  return err < 1e-4 ? 0 : 1;
}
