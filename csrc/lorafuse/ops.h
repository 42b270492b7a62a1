// lorafuse — the C++ API of every op (the umbrella header): each function calls its op through the PyTorch
// dispatcher (torch.ops.lorafuse.*), so C++ and Python callers reach the same CPU, CUDA, Meta and Autograd kernels.
#pragma once

#include <lorafuse/ops/adapted_weight.h>
#include <lorafuse/ops/dora.h>
#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/lora_embedding.h>
#include <lorafuse/ops/lora_linear.h>
#include <lorafuse/ops/lora_multi.h>
#include <lorafuse/ops/merge.h>
#include <lorafuse/ops/nf.h>
#include <lorafuse/ops/nf4.h>
