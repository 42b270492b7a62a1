// Autocast kernels (lora_linear4bit's is beside its composite, nf_lora_linear_composite.cpp): inside torch.autocast,
// x, weight and bias run in the autocast dtype, as F.linear's do; float32 adapters stay float32 (the op takes fp32
// lora_a/lora_b with fp16/bf16 x and accumulates in fp32), other adapters follow x. The casts are ordinary
// differentiable ops, so gradients reach the original (e.g. float32) tensors.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/lora_linear.h>

namespace lorafuse::autocast {
namespace {

template <c10::DeviceType kDevice, c10::DispatchKey kKey>
at::Tensor lora_linear_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  const auto adapter = [&](const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : cast(t); };
  std::optional<at::Tensor> bias_cast;
  if (bias.has_value() && bias->defined()) bias_cast = cast(*bias);
  return lorafuse::lora_linear(cast(x), cast(weight), bias_cast, adapter(lora_a), adapter(lora_b), scale, dropout_p);
}

// lora_add: x goes to the autocast dtype (adapters in float32 stay so); base_out is what the base gave.
template <c10::DeviceType kDevice, c10::DispatchKey kKey>
at::Tensor lora_add_autocast(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, double scale, double dropout_p) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  const auto adapter = [&](const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : cast(t); };
  return lorafuse::lora_add(base_out, cast(x), adapter(lora_a), adapter(lora_b), scale, dropout_p);
}

}  // namespace
}  // namespace lorafuse::autocast

TORCH_LIBRARY_IMPL(lorafuse, AutocastCPU, m) {
  m.impl("lora_linear", &lorafuse::autocast::lora_linear_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("lora_add", &lorafuse::autocast::lora_add_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(lorafuse, AutocastCUDA, m) {
  m.impl("lora_linear",
         &lorafuse::autocast::lora_linear_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("lora_add", &lorafuse::autocast::lora_add_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}
