// The backward of lora_multi_add as ATen calls on any device: each adapter's rows gathered once in segment order,
// their GEMMs, the LoRA terms of dX scattered back. The device-specific part is only the dropout mask of a gathered
// block of rows (a RowMask: the CPU's Philox words, or the CUDA mask kernel), so the math is written once.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <functional>
#include <tuple>
#include <vector>

namespace lorafuse::detail {

// rows [n, in] (contiguous, the accumulation dtype) *= the forward's dropout mask of batch rows row_ids [n] / (1 - p).
using RowMask = std::function<void(at::Tensor& rows, const at::Tensor& row_ids)>;

// Runs fn(i, start, n) for every adapter i with n > 0 rows in the batch (order[start : start + n]); reads offsets on
// the host (one small copy).
void for_each_segment(const at::Tensor& offsets, const std::function<void(int64_t, int64_t, int64_t)>& fn);

// order[0 : offsets[n]]: the rows that have an adapter (lora_segments lists the base's rows after them).
at::Tensor adapter_rows(const at::Tensor& order, const at::Tensor& offsets);

// Segment [start, start + n) of `sorted` (the batch's rows gathered in segment order) in dtype `acc`, masked by
// `mask` (when set) with the dropout of their own batch rows order[start : start + n]: a new tensor when masked.
at::Tensor segment_rows(const at::Tensor& sorted, const at::Tensor& order, int64_t start, int64_t n, at::ScalarType acc,
                        const RowMask& mask);

// lora_multi_add_backward's results (arguments checked by the caller): grad_x [..., in] with the LoRA terms (rows
// without an adapter: 0), each adapter's dA and dB from its rows; unrequested ones empty. `mask` empty: no dropout.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
    at::ArrayRef<double> scale, const at::Tensor& order, const at::Tensor& offsets, std::array<bool, 3> output_mask,
    const RowMask& mask);

}  // namespace lorafuse::detail
