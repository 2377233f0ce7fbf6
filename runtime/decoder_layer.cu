#include "runtime/decoder_layer.h"

#include <cmath>
#include <string>

#include "formats/error.h"
#include "kernels/activation/swiglu.h"
#include "kernels/attention_prefill/attention_prefill.h"
#include "kernels/norm/rmsnorm.h"
#include "kernels/rope/rope_qkv.h"
#include "runtime/forward_profiler.h"

namespace oscar::rt {

namespace {
void check(kern::Status s, const std::string& where) {
  if (s != kern::Status::Ok) throw Error(where, "kernel launch refused: " + std::string(kern::status_name(s)));
}
}  // namespace

void run_decoder_layer(const fmt::ModelConfig& c, LtGemm& gemm, const float* inv_freq, const DeviceLayerWeights& L,
                       const uint16_t* next_norm, int64_t l, const DecoderLayerIo& io, DeviceObserver* observer,
                       LayerPart part, Stream st) {
  const int64_t T = io.num_tokens, S = io.num_sequences;
  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t d = c.head_dim, nqkv = qd + 2 * kvd;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const std::string where = "forward: layer " + std::to_string(l);
  if (T == 0) return;
  auto mark = [&](const char* op) {
    if (io.profiler) io.profiler->mark(st, op);
  };
  const bool qkv_bf16 = io.qkv_bf16 && !(observer && observer->wants_fp32());
  mark("qkv_proj");
  gemm.xwt(io.normed, T, H, L.qkv, nqkv, io.qkv, qkv_bf16 ? GemmOut::BF16 : GemmOut::F32, 0.f, st,
           where + " qkv_proj");

  kern::RopeQkvShape rope_shape{T, c.num_heads, c.num_kv_heads, d, nqkv};
  kern::RopeQkvArgs ra;
  if (qkv_bf16) ra.qkv_bf16 = reinterpret_cast<const uint16_t*>(io.qkv);
  else ra.qkv = io.qkv;
  ra.bias = L.qkv_bias;
  ra.q_norm_weight = L.q_norm;
  ra.k_norm_weight = L.k_norm;
  ra.norm_eps = eps;
  ra.positions = io.positions;
  ra.inv_freq = inv_freq;
  ra.q_out = io.q;
  ra.k_out = io.k;
  ra.v_out = io.v;
  if (observer && observer->wants_fp32()) {
    ra.q_f32 = io.obs_q;
    ra.k_pre_rope_f32 = io.obs_k_pre;
    ra.k_f32 = io.obs_k;
    ra.v_f32 = io.obs_v;
  }
  mark("rope_qkv");
  check(kern::rope_qkv(rope_shape, ra, st), where + " rope_qkv");

  if (observer) {
    mark("observer");
    DeviceAttentionInputs in;
    in.layer = l;
    in.num_tokens = T;
    in.num_sequences = S;
    in.num_heads = c.num_heads;
    in.num_kv_heads = c.num_kv_heads;
    in.head_dim = d;
    in.cu_seqlens = io.cu_seqlens;
    in.positions = io.positions;
    in.q = ra.q_f32;
    in.k_pre_rope = ra.k_pre_rope_f32;
    in.k = ra.k_f32;
    in.v = ra.v_f32;
    in.k_bf16 = io.k;
    in.v_bf16 = io.v;
    in.stream = st;
    observer->on_attention_inputs(in);
  }
  if (part == LayerPart::AttentionInputsOnly) return;

  kern::PrefillAttentionArgs attn;
  attn.q = io.q;
  attn.k = io.k;
  attn.v = io.v;
  attn.out = io.attn;
  attn.q_row_stride = qd;
  attn.k_row_stride = kvd;
  attn.v_row_stride = kvd;
  attn.out_row_stride = qd;
  attn.cu_seqlens = io.cu_seqlens;
  attn.num_seqs = static_cast<int32_t>(S);
  attn.max_seqlen = io.max_seqlen;
  attn.total_tokens = T;
  attn.num_heads = static_cast<int32_t>(c.num_heads);
  attn.num_kv_heads = static_cast<int32_t>(c.num_kv_heads);
  attn.head_dim = static_cast<int32_t>(d);
  attn.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  attn.kernel = io.attention_kernel;
  mark("attention");
  check(kern::attention_prefill(attn, st), where + " attention_prefill");
  // Sublayer output projection + residual add + the norm after it (post-attention norm, or the next layer's input
  // norm / the final norm after the MLP).
  // proj_name is a string literal: the profiler keeps the pointer.
  auto project_add_norm = [&](const uint16_t* in, int64_t k, const uint16_t* w, const uint16_t* norm,
                              const char* proj_name, const char* norm_name) {
    mark(proj_name);
    if (io.residual_in_gemm) {
      gemm.xwt(in, T, k, w, H, io.x, GemmOut::F32, 1.f, st, where + " " + proj_name + " (+ residual)");
      mark("rmsnorm");
      check(kern::rmsnorm(io.x, T, H, norm, eps, io.normed, st), where + " " + norm_name);
    } else {
      gemm.xwt(in, T, k, w, H, io.proj, GemmOut::F32, 0.f, st, where + " " + proj_name);
      mark("add_rmsnorm");
      check(kern::add_rmsnorm(io.x, io.proj, T, H, norm, eps, io.normed, st), where + " " + norm_name);
    }
  };
  project_add_norm(io.attn, qd, L.o, L.post_attention_norm, "o_proj", "post_attention_layernorm");
  mark("gate_up_proj");
  gemm.xwt(io.normed, T, H, L.gate_up, 2 * I, io.gate_up, GemmOut::BF16, 0.f, st, where + " gate_up_proj");
  mark("swiglu");
  check(kern::swiglu(io.gate_up, T, I, io.act, st), where + " swiglu");
  // The MLP's residual add is followed by the next layer's input norm, or the final norm.
  project_add_norm(io.act, I, L.down, next_norm, "down_proj", "residual + next norm");
}

}  // namespace oscar::rt
