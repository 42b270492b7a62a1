// PYBIND11_MODULE(_C): loading this module loads liblorafuse, which registers torch.ops.lorafuse.*. The
// bindings are split by area (bind_<area>.cpp, one function per binding); python/lorafuse/_C.pyi types them.
#include <lorafuse/ops.h>
#include <lorafuse/quant/nf_code.h>

#include "csrc/python/convert.h"

PYBIND11_MODULE(_C, m) {
  namespace lp = lorafuse::python;
  m.doc() = "lorafuse native module. Importing it registers the torch.ops.lorafuse operators.";
  m.attr("__version__") = LORAFUSE_VERSION;
  m.def("has_cuda_kernels", &lorafuse::has_cuda_kernels,
        "Whether this build of lorafuse has its CUDA kernels (LORAFUSE_CUDA at build time).");
  m.def("nf4_code_map", &lorafuse::nf4_code_map, "The 16 NF4 code values (bitsandbytes' quant_map), float32 [16].");
  m.def(
      "nf_code", [](int64_t bits) { return lp::translating([&] { return lorafuse::nf_code(bits); }); },
      pybind11::arg("bits"),
      "The NF-b code (b-bit NormalFloat, 2 <= b <= 8) as bitsandbytes builds NF4, float32 [2^b]; nf_code(4) equals "
      "nf4_code_map().");
  m.def(
      "nf_bits_per_weight",
      [](std::vector<int64_t> format, at::ScalarType stat_dtype) {
        return lp::translating([&] { return lorafuse::nf_bits_per_weight(format, stat_dtype); });
      },
      pybind11::arg("format"), pybind11::arg("stat_dtype"),
      "Bits per weight of a quantized-weight format [bits, blocksize, stat_bits, stat_blocksize] with statistic "
      "scales in stat_dtype (the one offset per matrix left out).");
  m.def(
      "_is_bnb_nf4",
      [](std::vector<int64_t> format, at::ScalarType stat_dtype) {
        return lp::translating([&] { return lorafuse::is_bnb_nf4(format, stat_dtype); });
      },
      pybind11::arg("format"), pybind11::arg("stat_dtype"),
      "Whether the format with statistic scales in stat_dtype is bitsandbytes' NF4 (lorafuse::is_bnb_nf4).");
  m.def("dynamic_code_map", &lorafuse::dynamic_code_map,
        "The dynamic 8-bit code of double quantization (bitsandbytes' nested_quant_map), float32 [256].");
  lp::bind_config(m);
  lp::bind_nn(m);
  lp::bind_models(m);
  lp::bind_quant(m);
  lp::bind_peft(m);
  lp::bind_io(m);
}
