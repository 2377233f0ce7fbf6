#pragma once
// CPU reference of decode_attention: the same params with host pointers; double accumulation, exact softmax.
// INT2 tokens are dequantized with calib::int_dequant (lib/calib/quantizer_ref.h), bf16 tokens read as is.
#include "kernels/attention_decode/decode_attention.h"

namespace oscar::kern {

// Throws oscar::Error when can_implement rejects p. Ignores num_splits/workspace. Writes p.out or p.out_bf16.
void decode_attention_ref(const DecodeAttentionParams& p);

// The rotated-basis key or value of token t of sequence b and KV head h, as the kernel reads it (fp32).
void read_cached_head_ref(const DecodeAttentionParams& p, bool value, int32_t b, int32_t h, int64_t t, float* out);

}  // namespace oscar::kern
