#pragma once
// SwiGLU on the output of the fused gate|up projection: out[t, i] = silu(gate[t, i]) * up[t, i], with
// gate = gate_up[t, 0:I] and up = gate_up[t, I:2I]. One GEMM with the stacked [gate; up] weight replaces two
// launches and reads the normalized activations once.
#include <cstdint>

#include "kernels/common/status.h"

namespace oscar::kern {

// gate_up [rows, 2 * inter] bf16 bits, out [rows, inter] bf16 bits (device). Math in fp32, one rounding at the end.
Status swiglu(const uint16_t* gate_up, int64_t rows, int64_t inter, uint16_t* out, Stream stream);

// CPU reference: fp32 in, fp32 out, same layout.
void swiglu_ref(const float* gate_up, int64_t rows, int64_t inter, float* out);

}  // namespace oscar::kern
