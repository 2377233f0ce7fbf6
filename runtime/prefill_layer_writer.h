#pragma once
// rt::PrefillLayerWriter — the prefill's cache writes, per layer, off the forward's critical path (issue #6).
//
// A prefill observer (DeviceObserver) gets each layer's post-RoPE bf16 K/V in buffers the forward overwrites with
// the next layer's. Without overlap and with the cache's head dim, the write reads them in place. Otherwise the
// writer copies them into the cache's staging layout [rows, cache_head_dim] on the forward's stream (~0.1 ms per
// layer at 8 KV heads x 32K tokens; zero-padding small head dims) and then runs the write itself (rotate, clip,
// quantize, pack: ~1.5 ms per layer with error-feedback rounding) on a side stream of lower priority, so the
// write overlaps the next layers' GEMMs and attention instead of following them. Two staging pairs alternate by
// layer: the forward's copy for layer l + 2 waits (an event, on the GPU) for the write of layer l, which read the
// same pair. join() makes the forward's stream wait for every write issued, before anything reads the cache.
//
// The writes and their inputs are the same as with overlap off (the same kernels on the same bytes), so the cache
// is bit-identical either way; only when the writes run changes.
#include <cstdint>
#include <functional>
#include <string>

#include "runtime/device_buffer.h"
#include "runtime/device_model.h"

namespace oscar::rt {

// bf16 head vectors [rows, src_dim] -> [rows, dst_dim] on `stream`, bits copied: dims past src_dim become 0, dims past
// dst_dim are dropped (the zero padding of small head dims to the cache's head dim and back); a plain device copy
// where the dims agree.
void copy_heads(const uint16_t* src, int64_t rows, int64_t src_dim, uint16_t* dst, int64_t dst_dim, Stream stream,
                const std::string& where);

class PrefillLayerWriter {
 public:
  // The write of one layer: bf16 K and V [tokens, num_kv_heads, dst_dim] (staging, valid until the call's work on
  // `stream` has run), enqueued on `stream`.
  using WriteFn = std::function<void(int64_t layer, const uint16_t* k, const uint16_t* v, Stream stream)>;

  // overlap = false: copy and write on the forward's stream, one staging pair (what the engine did before).
  explicit PrefillLayerWriter(bool overlap);
  ~PrefillLayerWriter();  // waits for the side stream's work (staging buffers may not go while it reads them)
  PrefillLayerWriter(const PrefillLayerWriter&) = delete;
  PrefillLayerWriter& operator=(const PrefillLayerWriter&) = delete;

  // Stages in.k_bf16 / in.v_bf16 ([in.num_tokens, in.num_kv_heads, in.head_dim], ready in in.stream's order) with
  // dst_dim dims per head (zero-padded or cut) and enqueues `write` for them (without overlap and with dst_dim =
  // head_dim, for the forward's tensors themselves). Throws oscar::Error naming `where`.
  void write_layer(const DeviceAttentionInputs& in, int64_t dst_dim, const WriteFn& write, const std::string& where);

  // Makes `stream` (the forward's) wait for every write issued so far. Without overlap there is nothing to wait for.
  void join(Stream stream, const std::string& where);

  // Blocks the host until every write issued so far has run (or failed), without throwing: for error paths that
  // free what the writes target. Without overlap there is nothing to wait for.
  void drain() noexcept;

 private:
  bool overlap_;
  Stream side_ = nullptr;                 // overlap only
  void* ready_[2] = {nullptr, nullptr};   // cudaEvent_t: staging pair i filled (recorded on the forward's stream)
  void* done_[2] = {nullptr, nullptr};    // cudaEvent_t: staging pair i read by its write (on the side stream)
  bool used_[2] = {false, false};         // done_[i] has been recorded (a later fill of pair i waits for it)
  int last_ = -1;                         // the pair of the latest write (join waits for its done_ event)
  int64_t next_pair_ = 0;
  DeviceBuffer stage_k_[2], stage_v_[2];
};

}  // namespace oscar::rt
