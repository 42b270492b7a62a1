// The one TORCH_LIBRARY(lorafuse, m): every schema of the project, each with a one-line comment.
#include <torch/library.h>

TORCH_LIBRARY(lorafuse, m) {
  // y = x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ; differentiable in x, bias, lora_a, lora_b (not weight).
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
      "float dropout_p=0.0) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // Training forward: also returns u = dropout(x)·Aᵀ [T, r] and the dropout rng_state [2] for backward.
  m.def(
      "lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
      "float dropout_p) -> (Tensor out, Tensor u, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // Backward of lora_linear and lora_add; output_mask = (x, lora_a, lora_b, bias); unrequested grads are empty
  // [0]. weight None (lora_add): dX is the LoRA term alone, out = lora_b.size(0).
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor lora_a, Tensor lora_b, Tensor u, "
      "Tensor rng_state, float scale, float dropout_p, bool[4] output_mask) "
      "-> (Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_bias)");

  // ---- lora_add: the LoRA branch on top of a base layer's own output (a base that lorafuse calls as it is)
  // y = base_out + scale·(dropout(x)·Aᵀ)·Bᵀ; base_out [..., out], x [..., in], A [r, in], B [out, r]; y has
  // base_out's dtype; differentiable in base_out, x, lora_a, lora_b. Backward: lora_linear_backward, weight None.
  m.def("lora_add(Tensor base_out, Tensor x, Tensor lora_a, Tensor lora_b, float scale, float dropout_p=0.0) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  // The branch over a base called as it is, with the adapter-dtype rule (CompositeImplicitAutograd): x is cast to
  // lora_a's dtype unless it is x's or float32 (lora_add accumulates in float32 either way), then lora_add.
  m.def(
      "lora_branch(Tensor base_out, Tensor x, Tensor lora_a, Tensor lora_b, float scale, float dropout_p=0.0) -> "
      "Tensor",
      {at::Tag::nondeterministic_seeded});
  // Training forward of lora_add: also u = dropout(x)·Aᵀ [T, r] and the dropout rng_state [2].
  m.def(
      "lora_add_forward(Tensor base_out, Tensor x, Tensor lora_a, Tensor lora_b, float scale, float dropout_p) "
      "-> (Tensor out, Tensor u, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});

  // ---- many adapters in one batch: each row of x goes through its own adapter (or none)
  // Rows grouped by adapter, once per batch (CompositeExplicitAutograd; every layer of a forward shares the result):
  // row_adapter int64 [T] holds each row's adapter index in [0, num_adapters), or -1 for the base alone → order int64
  // [T] (the rows grouped by adapter, each group in row order, then the base's rows) and offsets int64
  // [num_adapters + 1] (adapter i's rows are order[offsets[i] : offsets[i + 1]]; order[offsets[n]:] the base's).
  // Static shapes (no size depends on the values; Meta and torch.compile work). The index check reads row_adapter
  // once (a small copy from a device).
  m.def("lora_segments(Tensor row_adapter, int num_adapters) -> (Tensor order, Tensor offsets)");
  // y = base_out; y[t] += scaleᵢ·(dropout(x[t])·Aᵢᵀ)·Bᵢᵀ for every row t of adapter i's segment (lora_segments), as
  // lora_add computes a row (float32 accumulation, float64 for float64; the dropout mask of row t is the one lora_add
  // draws for row t of the same batch). Adapters may differ in rank; lora_a[i] [rᵢ, in], lora_b[i] [out, rᵢ];
  // base_out [..., out], x [..., in] (rows: all but the last dimension). Differentiable in base_out, x, lora_a,
  // lora_b: each adapter's gradients come from its rows alone.
  m.def(
      "lora_multi_add(Tensor base_out, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float[] scale, Tensor order, "
      "Tensor offsets, float dropout_p=0.0) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // Training forward of lora_multi_add: also the dropout rng_state [2] for backward.
  m.def(
      "lora_multi_add_forward(Tensor base_out, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float[] scale, "
      "Tensor order, Tensor offsets, float dropout_p) -> (Tensor out, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // Its backward for x and every adapter (output_mask = (x, lora_a, lora_b)); grad base_out is grad_out itself.
  // grad_x [..., in] holds the LoRA terms (rows without an adapter: 0); unrequested grads are empty.
  m.def(
      "lora_multi_add_backward(Tensor grad_out, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float[] scale, "
      "Tensor order, Tensor offsets, Tensor rng_state, float dropout_p, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor[] grad_lora_a, Tensor[] grad_lora_b)");

  // Per token (decode, serving): y = base_out; y[t] += scaleᵢ·(x[t]·Aᵢᵀ)·Bᵢᵀ with i = row_adapter[t] (int64 [T], one
  // per row of x; -1: the base alone), no dropout. lora_multi_add's result over lora_segments(row_adapter) without
  // grouping the rows first (CUDA: one shrink block per token and rank, one expand block per token and column tile).
  // Differentiable in base_out, x, lora_a and lora_b (the backward groups the rows and runs lora_multi_add_backward).
  m.def(
      "lora_token_add(Tensor base_out, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float[] scale, "
      "Tensor row_adapter) -> Tensor");

  // ---- an embedding layer's LoRA branch (PEFT's lora_embedding_A [r, num], lora_embedding_B [dim, r]):
  // y = base_out + scale·embedding(indices, Aᵀ)·Bᵀ, summed in the wider dtype and rounded to base_out's; padding_idx
  // (−1: none), scale_grad_by_freq and sparse act on A's gradient as the base embedding's. CompositeImplicitAutograd.
  m.def(
      "lora_embedding(Tensor base_out, Tensor indices, Tensor lora_a, Tensor lora_b, float scale, int padding_idx=-1, "
      "bool scale_grad_by_freq=False, bool sparse=False) -> Tensor");

  // ---- a base weight with an adapter added, for bases that read their weights rather than being called
  // (nn.MultiheadAttention): W + scale·B·A in W's dtype, the product in the adapter's dtype; weight [out, in],
  // lora_a [r, in], lora_b [out, r]. CompositeImplicitAutograd (gradients reach A and B).
  m.def("lora_adapted_weight(Tensor weight, Tensor lora_a, Tensor lora_b, float scale) -> Tensor");

  // ---- merging: device-generic (CompositeExplicitAutograd), no gradients
  // scale·B·A [out, in] in float32 (float64 when A is float64): what an adapter adds to the base weight.
  m.def("lora_delta_weight(Tensor lora_a, Tensor lora_b, float scale) -> Tensor");
  // weight + Σᵢ scaleᵢ·Bᵢ·Aᵢ, summed in float32 (float64 for float64) from `weight` and rounded once to weight's
  // dtype; raises ValueError (weight untouched) if the result is not finite. Merging several adapters one by
  // one from the unmerged weight gives the same bits as merging them at once. Unmerging is exact because
  // the layers keep the unmerged weight (no subtraction).
  // magnitude: one entry per adapter, None for plain LoRA, a DoRA adapter's magnitude vector m [out] otherwise: it
  // rescales the rows, W ← m / ‖W₀ + scale·B·A‖ ⊙ (W + scale·B·A) with W₀ the weight given (PEFT's order: in turn).
  m.def(
      "lora_merge(Tensor weight, Tensor[] lora_a, Tensor[] lora_b, float[] scale, Tensor?[]? magnitude=None) -> "
      "Tensor");

  // ---- DoRA (use_dora): weight-decomposed LoRA, PEFT's numerics (<lorafuse/ops/dora.h>)
  // ‖W + scale·B·A‖ per output row [out] in float32 (float64 for float64), without forming W + scale·B·A; no gradients.
  m.def("dora_weight_norm(Tensor weight, Tensor lora_a, Tensor lora_b, float scale) -> Tensor");
  // y = g ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + b with g = magnitude / dora_weight_norm (a constant); base_out: the base's own
  // output for x (a base called as it is); with dropout PEFT's form (a second base GEMM on dropout(x)).
  // CompositeImplicitAutograd: differentiable in x, bias, lora_a, lora_b, magnitude, base_out.
  m.def(
      "dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, float dropout_p, "
      "Tensor magnitude, Tensor? base_out=None) -> Tensor",
      {at::Tag::nondeterministic_seeded});

  // ---- The quantized-weight format of QLoRA and LQ-LoRA (cuda/shared/nf_format.h has the rules): NF-b codes in absmax
  // blocks, the statistics quantized again; format = [bits, blocksize, stat_bits, stat_blocksize].
  // weight (float32/bfloat16/float16, finite) → packed uint8 [ceil(n·bits/8), 1], absmax float32 [blocks] (stat_bits
  // = 0) or uint8 [ceil(blocks·stat_bits/8)], nested_absmax [ceil(blocks/stat_blocksize)] in stat_dtype and offset
  // float32 [] (both [0] without double quantization).
  m.def(
      "quantize_nf(Tensor weight, int[] format, ScalarType stat_dtype=float) "
      "-> (Tensor packed, Tensor absmax, Tensor nested_absmax, Tensor offset)");
  // The weight of `shape` in `dtype`: code[index]·the statistic of its block in float32, rounded once to dtype.
  m.def(
      "dequantize_nf(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int[] format, int[] shape, "
      "ScalarType dtype) -> Tensor");
  // y = x·Wᵀ + bias for the quantized W [out_features, in] (in = x.size(-1)), dequantized a tile of rows at a time in
  // x's dtype (never the whole dense weight); differentiable in x and bias, never in W.
  m.def(
      "nf_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int[] format, "
      "int out_features, Tensor? bias=None) -> Tensor");
  // dX = dY·W [..., in_features] for nf_linear's backward, tile by tile, accumulated in float32.
  m.def(
      "nf_linear_backward(Tensor grad_out, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int[] format, int in_features) -> Tensor");
  // The LoRA layer over a quantized base in one op: y = nf_linear(x, W, bias) + scale·(dropout(x)·Aᵀ)·Bᵀ, the branch
  // by lora_add's rules (lora_a in x's dtype or float32, accumulated in float32, float64 for float64); differentiable
  // in x, bias, lora_a and lora_b, never in W. CPU: one kernel (the branch accumulated into the base's output in place,
  // dX's LoRA term and the dY·W tiles summed into one buffer); other devices (CompositeExplicitAutograd): nf_linear
  // and lora_add.
  m.def(
      "nf_lora_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int[] format, "
      "int out_features, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, float dropout_p=0.0) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // Training forward: also u = dropout(x)·Aᵀ [T, r] and the dropout rng_state [2], as lora_add_forward.
  m.def(
      "nf_lora_linear_forward(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int[] format, int out_features, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, float dropout_p) "
      "-> (Tensor out, Tensor u, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // Its backward; output_mask = (x, lora_a, lora_b, bias), unrequested grads empty [0]; dX = dY·W + the LoRA term.
  m.def(
      "nf_lora_linear_backward(Tensor grad_out, Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? offset, int[] format, Tensor lora_a, Tensor lora_b, Tensor u, Tensor rng_state, float scale, "
      "float dropout_p, bool[4] output_mask) "
      "-> (Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_bias)");

  // A quantized layer's forward (bitsandbytes' Linear4bit rule): x and bias cast to compute_dtype, nf_linear, the
  // result cast back to x's dtype. CompositeImplicitAutograd: autograd, Meta and devices come from the ops it calls.
  m.def(
      "linear_nf(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int[] format, "
      "int out_features, Tensor? bias, ScalarType compute_dtype) -> Tensor");
  // A LoRA layer over a quantized layer (linear_nf's compute-dtype rule, lora_branch's adapter-dtype rule), once for
  // the C++ LoraLinear4bit and Python's quantized kinds (CompositeImplicitAutograd): nf_lora_linear when x is already
  // in compute_dtype and lora_a in x's dtype or float32, else lora_branch(linear_nf(...)); under autocast always the
  // latter.
  m.def(
      "lora_linear_nf(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int[] format, "
      "int out_features, Tensor? bias, ScalarType compute_dtype, Tensor lora_a, Tensor lora_b, float scale, "
      "float dropout_p=0.0) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // Merging into the quantized weight (asked for explicitly; never differentiated): W' = dequant(W) + Σ scaleᵢ·Bᵢ·Aᵢ in
  // float32 (lora_merge's rules), quantized again in the same format (statistic scales in nested_absmax's dtype) →
  // the new (packed, absmax, nested_absmax, offset) and error float32 [2] = (‖Ŵ − W'‖ / ‖W'‖, ‖Ŵ − W'‖ / ‖W' − W‖)
  // with Ŵ the dequantized result: the relative output change for uncorrelated inputs, and the rounding measured
  // against what the adapters add.
  m.def(
      "nf_merge(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int[] format, int[] shape, "
      "Tensor[] lora_a, Tensor[] lora_b, float[] scale) "
      "-> (Tensor packed, Tensor absmax, Tensor nested_absmax, Tensor offset, Tensor error)");

  // LoftQ's initialisation (PEFT's loftq_init, never differentiated): Q = W; repeat num_iter times { Q = dequant(
  // quantize_nf(W − L·R)) in format [bits, 64, 0, 0] (at 4 bits bitsandbytes' NF4, blocks of 64, no double
  // quantization: what PEFT quantizes with), L·R = the rank-r truncated SVD of W − Q (L = U·√S, R = √S·Vᵀ) }, in
  // float32 (L·R = 0 before the first quantization). → qweight (Q in weight's dtype, on its device), lora_a = R
  // float32 [r, in], lora_b = L float32 [out, r] (PEFT's factors; a layer with scale s starts from R/√s and L/√s).
  m.def("loftq_init(Tensor weight, int bits, int r, int num_iter=1) -> (Tensor qweight, Tensor lora_a, Tensor lora_b)");

  // ---- NF4: the 4-bit NormalFloat base of QLoRA with bitsandbytes' names and exact bytes: the ops above at
  // format [4, blocksize, 8, 256] (double quantization, float32 scales) or [4, blocksize, 0, 0]
  // (CompositeImplicitAutograd, csrc/ops/composite/nf4_composite.cpp), blocksize one of bitsandbytes' 32 ... 4096.
  // weight (float32/bfloat16/float16, finite) → packed uint8 [ceil(n/2), 1], absmax float32 [blocks] (uint8 codes
  // with double_quant), nested_absmax float32 [ceil(blocks/256)] and offset float32 [] (both [0] without).
  m.def(
      "quantize_nf4(Tensor weight, int blocksize=64, bool double_quant=True) "
      "-> (Tensor packed, Tensor absmax, Tensor nested_absmax, Tensor offset)");
  // The weight of `shape` in `dtype`: code[index]·absmax of its block in float32, rounded once to dtype.
  m.def(
      "dequantize_nf4(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int blocksize, "
      "int[] shape, ScalarType dtype) -> Tensor");
  // y = x·Wᵀ + bias for the NF4 weight W [out_features, in] (in = x.size(-1)), dequantized a tile of rows at a time
  // in x's dtype (never the whole dense weight); differentiable in x and bias, never in W.
  m.def(
      "nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int blocksize, "
      "int out_features, Tensor? bias=None) -> Tensor");
  // The 4-bit layer's forward (bitsandbytes' Linear4bit): x and bias cast to compute_dtype, nf4_linear, the result
  // cast back to x's dtype. CompositeImplicitAutograd: autograd, Meta and devices come from the ops it calls.
  m.def(
      "linear4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int blocksize, "
      "int out_features, Tensor? bias, ScalarType compute_dtype) -> Tensor");
  // Merging into 4 bits (asked for explicitly; never differentiated): W' = dequant(W) + Σ scaleᵢ·Bᵢ·Aᵢ in float32
  // (lora_merge's rules), quantized again with the same blocksize and double quantization (nested statistics given
  // ⇔ double_quant) → the new (packed, absmax, nested_absmax, offset) and error float32 [2] = (‖Ŵ − W'‖ / ‖W'‖,
  // ‖Ŵ − W'‖ / ‖W' − W‖) with Ŵ the dequantized result: the relative output change for uncorrelated inputs, and
  // the rounding measured against what the adapters add.
  m.def(
      "nf4_merge(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int blocksize, int[] shape, "
      "Tensor[] lora_a, Tensor[] lora_b, float[] scale) "
      "-> (Tensor packed, Tensor absmax, Tensor nested_absmax, Tensor offset, Tensor error)");
  // dX = dY·W [..., in_features] for nf4_linear's backward, tile by tile, accumulated in float32.
  m.def(
      "nf4_linear_backward(Tensor grad_out, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int blocksize, int in_features) -> Tensor");
  // ---- The QLoRA layer in one op: y = nf4_linear(x, W4, bias) + scale·(dropout(x)·Aᵀ)·Bᵀ, the branch by lora_add's
  // rules (lora_a in x's dtype or float32, accumulated in float32, float64 for float64); differentiable in x, bias,
  // lora_a and lora_b, never in W. CPU: one kernel (the branch accumulated into the base's output in place, dX's LoRA
  // term and the dY·W tiles summed into one buffer); other devices (CompositeExplicitAutograd): nf4_linear and
  // lora_add.
  m.def(
      "nf4_lora_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int blocksize, "
      "int out_features, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, float dropout_p=0.0) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // Training forward: also u = dropout(x)·Aᵀ [T, r] and the dropout rng_state [2], as lora_add_forward.
  m.def(
      "nf4_lora_linear_forward(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int blocksize, int out_features, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, float dropout_p) "
      "-> (Tensor out, Tensor u, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // Its backward; output_mask = (x, lora_a, lora_b, bias), unrequested grads empty [0]; dX = dY·W + the LoRA term.
  m.def(
      "nf4_lora_linear_backward(Tensor grad_out, Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? offset, int blocksize, Tensor lora_a, Tensor lora_b, Tensor u, Tensor rng_state, float scale, "
      "float dropout_p, bool[4] output_mask) "
      "-> (Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_bias)");
  // A LoRA layer over a 4-bit layer (linear4bit's compute-dtype rule, lora_branch's adapter-dtype rule), once for the
  // C++ LoraLinear4bit and Python's 4-bit kinds (CompositeImplicitAutograd): nf4_lora_linear when x is already in
  // compute_dtype and lora_a in x's dtype or float32, else lora_branch(linear4bit(...)).
  m.def(
      "lora_linear4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int blocksize, "
      "int out_features, Tensor? bias, ScalarType compute_dtype, Tensor lora_a, Tensor lora_b, float scale, "
      "float dropout_p=0.0) -> Tensor",
      {at::Tag::nondeterministic_seeded});
}
