// lorafuse::nf_code — the NF-b code tables (b-bit NormalFloat) that quantized bases choose from.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lorafuse {

/// The 2^bits values of the NF-bits code as a float32 CPU tensor, ascending from −1 to 1 with an exact 0, built as
/// bitsandbytes builds NF4 (cuda/shared/nf_code.h has the recipe); nf_code(4) is bitsandbytes' NF4 table to the bit.
/// ValueError naming `bits` unless 2 <= bits <= 8.
at::Tensor nf_code(int64_t bits);

}  // namespace lorafuse
