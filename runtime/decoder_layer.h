#pragma once
// One decoder layer of the GPU forward, shared by DeviceModel::forward (all layers per batch) and the layer-streaming
// calibration (runtime/layer_stream.h: one layer over all batches). Both call this one function, so a streamed
// layer runs the very same kernels, GEMM shapes and launch configurations as the resident forward: the observer
// sees bit-identical q/k/v.
// CUDA-free header.
#include <cstdint>

#include "formats/model_config.h"
#include "runtime/device_model.h"
#include "runtime/lt_gemm.h"

namespace oscar::rt {

// Device buffers of one packed batch for one layer call (sizes as DeviceModel::forward's Scratch).
struct DecoderLayerIo {
  int64_t num_tokens = 0;     // T
  int64_t num_sequences = 0;  // S
  int32_t max_seqlen = 0;
  const int32_t* positions = nullptr;   // device [T]
  const int32_t* cu_seqlens = nullptr;  // device [S + 1]
  float* x = nullptr;                   // fp32 [T, H] residual stream (updated in place by a Full call)
  uint16_t* normed = nullptr;           // bf16 [T, H]: this layer's input_layernorm(x) on entry
  float* qkv = nullptr;                 // fp32 [T, q_dim + 2 kv_dim] (or its first half as bf16: qkv_bf16)
  uint16_t *q = nullptr, *k = nullptr, *v = nullptr, *attn = nullptr;
  float* proj = nullptr;  // fp32 [T, H]
  uint16_t *gate_up = nullptr, *act = nullptr;
  float *obs_q = nullptr, *obs_k_pre = nullptr, *obs_k = nullptr, *obs_v = nullptr;  // fp32, observer only
  kern::PrefillKernel attention_kernel = kern::PrefillKernel::Auto;
  // true: o_proj and down_proj add into x in their GEMM epilogue (beta = 1), then a plain RMSNorm reads x;
  // false: they write `proj` and add_rmsnorm adds it. The same fp32 add of the same fp32 product either way; the
  // epilogue saves writing and reading `proj` ([T, H] fp32) per sublayer.
  bool residual_in_gemm = true;
  // true: the QKV GEMM writes bf16 into qkv's memory (read as bf16 bits) and the norm/RoPE kernel reads that, as
  // transformers' bias-free bf16 projections hand their output on; false: fp32. Ignored (fp32) when the observer
  // wants fp32 attention inputs: calibration statistics keep the unrounded projection.
  bool qkv_bf16 = false;
  ForwardProfiler* profiler = nullptr;  // per-op timing (benchmarks); null: no events
};

enum class LayerPart {
  Full,                  // attention + MLP; x += both; `normed` = next_norm(x) on exit
  AttentionInputsOnly,   // QKV projection + RoPE + observer, nothing after (x and normed untouched)
};

// Runs layer `layer` with weights `w` on `io` in `stream`, calling `observer` (may be null) with the attention inputs.
// `next_norm` is the RMSNorm weight the fused residual add normalizes with (the next layer's input norm, or the
// final norm); a Full call needs it. Throws oscar::Error naming the layer and kernel on a refused launch.
void run_decoder_layer(const fmt::ModelConfig& cfg, LtGemm& gemm, const float* inv_freq, const DeviceLayerWeights& w,
                       const uint16_t* next_norm, int64_t layer, const DecoderLayerIo& io, DeviceObserver* observer,
                       LayerPart part, Stream stream);

}  // namespace oscar::rt
