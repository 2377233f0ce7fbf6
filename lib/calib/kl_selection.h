#pragma once
// --candidate-metric kl (issue #10; docs/method.md, "Per-layer candidates"): the per-layer candidate choice scored
// by the end-to-end KL that `oscar eval` reports, on the calibrator's selection sequences (held-out calibration
// text, never evaluation text), instead of the per-layer attention-output proxy E.
//
// Why: E is measured at one layer's attention output and ignores how errors propagate through the later layers and
// the LM head; on qwen3-tiny-trained its ranking of the whole-head rotations did not match the KL ranking
// (docs/results.md). KL through the whole model is what the yardstick measures, so the choice is made on it.
//
// The numbers are eval's by construction: the reference is eval::simulated_logits with the BF16 cache mode, each
// candidate assignment eval::simulated_logits with the Oscar mode over a bundle holding those layers, and the KL is
// eval::compare_positions' KL(p_bf16 || p_mode) averaged over the positions t >= sink + recent of every sequence
// (eval's "beyond the window": the predictions that read quantized keys).
#include <cstdint>
#include <span>
#include <vector>

#include "formats/bundle.h"
#include "lib/calib/spectral_calibration.h"
#include "lib/model/cpu_model.h"

namespace oscar::calib {

// Mean KL beyond the bf16 windows of a fixed set of token sequences; the BF16 reference is run once.
class BeyondWindowKl {
 public:
  // Windows: sink / recent tokens stay bf16 (the bundle's quant.sink_tokens / recent_tokens must match them, which
  // operator() checks). Every sequence needs a position beyond sink + recent with a target (T > sink + recent + 1);
  // otherwise oscar::Error naming `where`.
  BeyondWindowKl(model::CpuModel& model, std::vector<std::vector<int32_t>> sequences, int64_t sink, int64_t recent,
                 const std::string& where);
  int64_t positions() const { return positions_; }
  int64_t sequences() const { return static_cast<int64_t>(sequences_.size()); }
  // Mean over every scored position of every sequence of KL(bf16 || bundle's simulated cache), in nats.
  double operator()(const fmt::Bundle& bundle) const;

 private:
  model::CpuModel* model_;
  std::vector<std::vector<int32_t>> sequences_;
  int64_t sink_, recent_, from_;
  std::vector<std::vector<float>> reference_;  // per sequence: logits rows [from_, T-1), the scored ones
  int64_t positions_ = 0;
};

// One greedy coordinate pass over the layers, 0 .. L-1, starting from sel.chosen (the proxy's choice): for layer l
// every candidate c is scored by kl() of the bundle whose layers are the current choice with layer l replaced by
// layers[c][l] (the current choice's own score is reused, not recomputed); layer l then keeps
// choose_layer_candidate(those KLs, whole-head flags, tolerance), and later layers are scored with it.
// `base` supplies everything but the layers (quant, windows, rotation groups 1). Fills sel.kl, kl_start, kl_final
// and sets sel.metric = Kl. Forward passes: per sequence 1 (reference) + 1 + L x (C - 1).
void choose_layers_by_kl(LayerSelection& sel, const std::vector<std::vector<fmt::LayerCalibration>>& layers,
                         const fmt::Bundle& base, const BeyondWindowKl& kl, double tolerance);

}  // namespace oscar::calib
