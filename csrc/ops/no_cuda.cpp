// Built instead of cuda/ when LORAFUSE_CUDA is off: every schema still has a CUDA kernel, one that says
// clearly that this build has none.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

namespace {

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, op,
              ": this build of lorafuse has no CUDA kernels (it was built with LORAFUSE_CUDA=0, or without nvcc or "
              "a CUDA build of torch). Rebuild with LORAFUSE_CUDA=1, or move the tensors to the CPU.");
}

at::Tensor lora_linear_no_cuda(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                               const at::Tensor&, const at::Tensor&, double, double) {
  no_cuda("lorafuse.lora_linear");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_forward_no_cuda(const at::Tensor&, const at::Tensor&,
                                                                           const std::optional<at::Tensor>&,
                                                                           const at::Tensor&, const at::Tensor&, double,
                                                                           double) {
  no_cuda("lorafuse.lora_linear_forward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_no_cuda(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, double, double, std::array<bool, 4>) {
  no_cuda("lorafuse.lora_linear_backward");
}

at::Tensor lora_add_no_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                            double) {
  no_cuda("lorafuse.lora_add");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_add_forward_no_cuda(const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&, const at::Tensor&, double,
                                                                        double) {
  no_cuda("lorafuse.lora_add_forward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf_no_cuda(const at::Tensor&, at::IntArrayRef,
                                                                               at::ScalarType) {
  no_cuda("lorafuse.quantize_nf");
}

at::Tensor dequantize_nf_no_cuda(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::ScalarType) {
  no_cuda("lorafuse.dequantize_nf");
}

at::Tensor nf_linear_no_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, at::IntArrayRef, int64_t,
                             const std::optional<at::Tensor>&) {
  no_cuda("lorafuse.nf_linear");
}

at::Tensor nf_linear_backward_no_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                      at::IntArrayRef, int64_t) {
  no_cuda("lorafuse.nf_linear_backward");
}

at::Tensor lora_multi_add_no_cuda(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                  at::ArrayRef<double>, const at::Tensor&, const at::Tensor&, double) {
  no_cuda("lorafuse.lora_multi_add");
}

std::tuple<at::Tensor, at::Tensor> lora_multi_add_forward_no_cuda(const at::Tensor&, const at::Tensor&, at::TensorList,
                                                                  at::TensorList, at::ArrayRef<double>,
                                                                  const at::Tensor&, const at::Tensor&, double) {
  no_cuda("lorafuse.lora_multi_add_forward");
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_add_backward_no_cuda(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::ArrayRef<double>, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, double, std::array<bool, 3>) {
  no_cuda("lorafuse.lora_multi_add_backward");
}

at::Tensor lora_token_add_no_cuda(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                  at::ArrayRef<double>, const at::Tensor&) {
  no_cuda("lorafuse.lora_token_add");
}

}  // namespace

TORCH_LIBRARY_IMPL(lorafuse, CUDA, m) {
  m.impl("lora_linear", &lora_linear_no_cuda);
  m.impl("lora_linear_forward", &lora_linear_forward_no_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_no_cuda);
  m.impl("lora_add", &lora_add_no_cuda);
  m.impl("lora_add_forward", &lora_add_forward_no_cuda);
  m.impl("quantize_nf", &quantize_nf_no_cuda);
  m.impl("dequantize_nf", &dequantize_nf_no_cuda);
  m.impl("nf_linear", &nf_linear_no_cuda);
  m.impl("nf_linear_backward", &nf_linear_backward_no_cuda);
  m.impl("lora_multi_add", &lora_multi_add_no_cuda);
  m.impl("lora_multi_add_forward", &lora_multi_add_forward_no_cuda);
  m.impl("lora_multi_add_backward", &lora_multi_add_backward_no_cuda);
  m.impl("lora_token_add", &lora_token_add_no_cuda);
}
