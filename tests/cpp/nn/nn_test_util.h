// Helpers for the module tests: error messages, tensor copies, devices.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "ops/lora_test_util.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>

namespace lorafuse_test {

// A fresh folder under $TMPDIR (or /tmp), removed with its contents at scope exit (failed test or not). POSIX calls
// rather than std::filesystem: libtorch.so exports its own copies of std::filesystem symbols, and remove_all
// resolved to that copy crashes.
struct TempDir {
  explicit TempDir(const std::string& stem = "lorafuse_test") {
    const char* tmp = std::getenv("TMPDIR");
    std::string name = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/" + stem + "_XXXXXX";
    REQUIRE(::mkdtemp(name.data()) != nullptr);
    path = name;
  }
  ~TempDir() {
    ::nftw(
        path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
        FTW_DEPTH | FTW_PHYS);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string path;
};

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

// The TORCH_WARN messages that f gives on this thread.
template <class F>
std::vector<std::string> warnings_of(F&& f) {
  struct Collected : c10::WarningHandler {
    void process(const c10::Warning& w) override { messages.push_back(w.msg()); }
    std::vector<std::string> messages;
  } collected;
  {
    c10::WarningUtils::WarningHandlerGuard guard(&collected);
    f();
  }
  return collected.messages;
}

// Runs f, which must succeed with one warning whose message contains every part.
template <class F>
void require_warning_parts(F&& f, const std::vector<std::string>& parts) {
  const auto messages = warnings_of(std::forward<F>(f));
  REQUIRE(messages.size() == 1);
  INFO("message: " << messages[0]);
  for (const auto& part : parts) {
    INFO("expected part: " << part);
    CHECK(contains(messages[0], part));
  }
}

// The devices the module tests run on: CPU, and CUDA where a GPU is present and the build has kernels.
inline std::vector<at::Device> module_devices() {
  std::vector<at::Device> devices{at::kCPU};
  if (gpu_available() && lorafuse::has_cuda_kernels()) devices.emplace_back(at::kCUDA);
  return devices;
}

}  // namespace lorafuse_test
