# Locate the torch that the chosen Python interpreter imports, so that the C++ build, the Python
# module and the tests all use one and the same LibTorch.
find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
          "import torch, sys; sys.stdout.write(';'.join([torch.utils.cmake_prefix_path, torch.__version__, str(torch.version.cuda or '')]))"
  OUTPUT_VARIABLE _lf_torch_info
  RESULT_VARIABLE _lf_torch_rc)
if(NOT _lf_torch_rc EQUAL 0)
  message(FATAL_ERROR "lorafuse: '${Python3_EXECUTABLE} -c \"import torch\"' failed; install torch (pip install -r requirements.txt) or set Python3_EXECUTABLE")
endif()
list(GET _lf_torch_info 0 LORAFUSE_TORCH_CMAKE_PREFIX)
list(GET _lf_torch_info 1 LORAFUSE_TORCH_VERSION)
list(GET _lf_torch_info 2 LORAFUSE_TORCH_CUDA_VERSION)
list(APPEND CMAKE_PREFIX_PATH "${LORAFUSE_TORCH_CMAKE_PREFIX}")
message(STATUS "lorafuse: torch ${LORAFUSE_TORCH_VERSION} (CUDA build: '${LORAFUSE_TORCH_CUDA_VERSION}') from ${LORAFUSE_TORCH_CMAKE_PREFIX}")
if(LORAFUSE_TORCH_VERSION VERSION_LESS 2.11)
  message(FATAL_ERROR "lorafuse needs torch >= 2.11, found ${LORAFUSE_TORCH_VERSION}")
endif()
