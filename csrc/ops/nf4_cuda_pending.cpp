// The NF4 ops on CUDA tensors without a CUDA kernel: a clear error instead of the dispatcher's "could not run with
// arguments from the CUDA backend". quantize_nf4 in every build; dequantize_nf4, nf4_linear and nf4_linear_backward
// only in a build without CUDA kernels (cuda/nf4/nf4_cuda.cu has them).
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace {

[[noreturn]] void pending(const char* op) {
  TORCH_CHECK(false, op,
              ": lorafuse has no CUDA kernel for this op yet; run it on CPU tensors (e.g. weight.cpu()) and move the "
              "results to the GPU");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4_cuda_pending(const at::Tensor&, int64_t, bool) {
  pending("lorafuse.quantize_nf4");
}

#if !LORAFUSE_WITH_CUDA
at::Tensor dequantize_nf4_cuda_pending(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&, int64_t, at::IntArrayRef, at::ScalarType) {
  pending("lorafuse.dequantize_nf4");
}

at::Tensor nf4_linear_cuda_pending(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, int64_t,
                                   const std::optional<at::Tensor>&) {
  pending("lorafuse.nf4_linear");
}

at::Tensor nf4_linear_backward_cuda_pending(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                                            int64_t) {
  pending("lorafuse.nf4_linear_backward");
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(lorafuse, CUDA, m) {
  m.impl("quantize_nf4", &quantize_nf4_cuda_pending);
#if !LORAFUSE_WITH_CUDA
  m.impl("dequantize_nf4", &dequantize_nf4_cuda_pending);
  m.impl("nf4_linear", &nf4_linear_cuda_pending);
  m.impl("nf4_linear_backward", &nf4_linear_backward_cuda_pending);
#endif
}
