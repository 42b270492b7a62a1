// PYBIND11_MODULE(_C): loading this module loads liblorafuse, which registers torch.ops.lorafuse.*.
#include <pybind11/pybind11.h>

#include <lorafuse/ops.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorafuse native module. Importing it registers the torch.ops.lorafuse operators.";
  m.attr("__version__") = LORAFUSE_VERSION;
  m.def("has_cuda_kernels", &lorafuse::has_cuda_kernels,
        "Whether this build of lorafuse has its CUDA kernels (LORAFUSE_CUDA at build time).");
}
