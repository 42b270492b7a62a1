// Helpers for the module tests: error messages, tensor copies, devices.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "ops/lora_test_util.h"

namespace lorafuse_test {

// Runs f, which must throw E whose message contains every part.
template <class E, class F>
void require_error_parts(F&& f, const std::vector<std::string>& parts) {
  const std::string msg = message_of<E>(std::forward<F>(f));
  INFO("message: " << msg);
  for (const auto& part : parts) {
    INFO("expected part: " << part);
    CHECK(contains(msg, part));
  }
}

// The devices the module tests run on: CPU, and CUDA where a GPU is present and the build has kernels.
inline std::vector<at::Device> module_devices() {
  std::vector<at::Device> devices{at::kCPU};
  if (gpu_available() && lorafuse::has_cuda_kernels()) devices.emplace_back(at::kCUDA);
  return devices;
}

}  // namespace lorafuse_test
