#pragma once
// The spectral method inside `oscar calibrate --method spectral` (docs/method.md, "The spectral method in oscar
// calibrate"): per-layer segment allocations fitted on held-out calibration samples (lib/calib/spectral.h), and the
// K/V weight of the split chosen on OTHER held-out calibration sequences by an attention-output proxy — never on
// evaluation text.
//
// Why a proxy beyond J_K + J_V: the relative key and value errors are in different units of harm (a logit error
// goes through a softmax, a value error straight into the output), so their best weighting depends on the model
// (docs/results.md: weight 1 loses in KL, 4 wins on qwen3-tiny-trained). The attention output of the layer is where
// both meet: for a query s that reads the quantized cache,
//     o_s = softmax(q_s Kᵀ/√d) V,   ô_s = the same with k̂_t, v̂_t for the tokens the cache stores quantized
//     E = Σ_{heads, s} ‖ô_s − o_s‖² / Σ ‖o_s‖²     (per layer; the proxy is the mean over layers)
// which weighs a key error by how much it moves the softmax and a value error by how much weight it is read with.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/bundle.h"
#include "formats/kv_quant_spec.h"
#include "lib/calib/clip_tuner.h"
#include "lib/calib/spectral.h"
#include "lib/calib/statistics.h"
#include "lib/model/cpu_model.h"
#include "lib/model/observer.h"

namespace oscar::calib {

// One whole sequence of one layer, as attention reads it (post-RoPE q and k).
struct AttentionSequence {
  int64_t tokens = 0;
  std::vector<float> q;  // [num_heads, tokens, d], or [num_heads, query_positions.size(), d] when those are set
  std::vector<float> k;  // [num_kv_heads, tokens, d]
  std::vector<float> v;  // [num_kv_heads, tokens, d]
  std::vector<int64_t> query_positions;  // empty: q holds every position; else the positions of q's rows, ascending
};

// The queries an attention proxy scores in a sequence of `tokens`: positions >= sink + recent (the ones that read
// quantized keys), every stride-th so at most max_queries remain.
std::vector<int64_t> scored_query_positions(int64_t tokens, int64_t sink, int64_t recent, int64_t max_queries);

// Keeps whole sequences (every layer); a runner may deliver one sequence in several calls (pos0 > 0).
class AttentionSequenceCollector : public model::Observer {
 public:
  explicit AttentionSequenceCollector(const StatisticsShape& shape);
  // Every position's q is kept.
  void begin_sequence();
  // Only the q rows at `query_positions` (ascending) are kept: what a proxy that scores those queries needs, at a
  // fraction of the memory (K/V stay whole, every query reads them).
  void begin_sequence(std::vector<int64_t> query_positions);
  void on_attention_inputs(const model::AttentionInputs& in) override;
  // [layer][sequence]
  std::vector<std::vector<AttentionSequence>> finish();

 private:
  StatisticsShape shape_;
  std::vector<std::vector<AttentionSequence>> layers_;
};

// How one layer is stored: rotations [groups, d, d] (groups 1 or num_kv_heads), specs with their clip ratios.
struct LayerQuantization {
  fmt::TensorQuantSpec k, v;
  std::vector<float> k_rotation, v_rotation;
  int64_t groups = 1;
};
// From a bundle layer (its own segments and clip ratios over the bundle's global spec).
LayerQuantization layer_quantization(const fmt::LayerCalibration& layer, const fmt::KvQuantSpec& global,
                                     int64_t groups);

// E above for one layer over `sequences`, the cache keeping tokens < sink and the query's last `recent` tokens
// exact (eval's decode-cache rule: key t is quantized for query s iff sink <= t <= s − recent). Queries: positions
// >= sink + recent (the ones that read quantized keys), every stride-th so at most max_queries per sequence.
// Returns 0/0 = 0 when no query reads the quantized cache.
struct AttentionError {
  double error = 0;   // Σ ‖ô − o‖²
  double energy = 0;  // Σ ‖o‖²
  double relative() const { return energy > 0 ? error / energy : 0.0; }
};
AttentionError attention_output_error(const std::vector<AttentionSequence>& sequences, int64_t num_heads,
                                      int64_t num_kv_heads, int64_t head_dim, const LayerQuantization& quant,
                                      int64_t sink, int64_t recent, int64_t max_queries);

// What a layer of a spectral bundle may be stored as (issue #10; docs/method.md, "Per-layer candidates"):
//   Spectral   the segmented layout of spectral_calibration() (the chosen k_weight)
//   Published  whole-head INT2 with the published stage's rotation of that layer (--rotation, default oscar:
//              eigen x Hadamard x bit-reversal) and its clip ratios
//   Hadamard   whole-head INT2 with the Sylvester Hadamard rotation (the calibrator's --rotation hadamard; no random
//              signs, so nothing to seed) at the same clip (fixed, or tuned by the same objective)
// Whole-head candidates exist because on qwen3-tiny-trained a single 2-bit segment in a mixing basis beat every
// spectral layout in KL on held-out docs text, and whole-head INT2 layers decode 2-3.5x faster on the H100.
enum class LayerCandidate : uint8_t { Spectral = 0, Published = 1, Hadamard = 2 };
std::string_view layer_candidate_name(LayerCandidate c);  // "spectral", "published", "hadamard"
// "spectral,published,hadamard" (any order, no repeats, must include spectral); errors name `where`.
std::vector<LayerCandidate> parse_layer_candidates(std::string_view csv, const std::string& where);
std::string join_layer_candidates(std::span<const LayerCandidate> cs);

// Both tensors one 2-bit segment over the whole head in integer storage: the runtime's INT2 fast path.
bool whole_head_int2(const fmt::KvQuantSpec& layer_spec);

// The per-layer rule: the least proxy wins (ties to the earlier candidate); when that one is not whole-head INT2,
// the whole-head candidate with the least proxy replaces it if its proxy is <= (1 + tolerance) x the least.
// With tolerance 0 this is the plain argmin.
size_t choose_layer_candidate(std::span<const double> proxy, std::span<const char> whole_head, double tolerance);

// What the per-layer choice minimizes (--candidate-metric):
//   Proxy  E above, per layer, on the selection sequences (no forward pass beyond the held-out one)
//   Kl     KL(BF16 || simulated quantized cache) of the model's next-token distribution at the selection sequences'
//          positions beyond the bf16 windows, i.e. `oscar eval`'s "KL beyond the window" on those sequences, with one
//          layer as the candidate and every other layer at its current choice (lib/calib/kl_selection.h)
// Kl exists because E is per-layer: on qwen3-tiny-trained its 3.6% preference for the published rotation in layer 4
// cost 1.14x KL on held-out docs text (docs/results.md, "Per-layer candidates").
enum class CandidateMetric : uint8_t { Proxy = 0, Kl = 1 };
std::string_view candidate_metric_name(CandidateMetric m);  // "proxy", "kl"
CandidateMetric parse_candidate_metric(std::string_view name, const std::string& where);

struct SpectralCalibrationOptions {
  SpectralOptions spectral;                        // budget, widths, Cayley; its k_weight is ignored (below)
  // --candidates / --whole-head-tolerance. The library keeps {Spectral} (its bundles byte-identical to before);
  // the CLI defaults to all three. Tolerance: relative proxy margin a whole-head layer may lose by and still be
  // chosen over a segmented one (docs/results.md, "Per-layer candidates", for how the default was chosen).
  std::vector<LayerCandidate> layer_candidates = {LayerCandidate::Spectral};
  double whole_head_tolerance = 0.02;
  // --candidate-metric, --kl-seqs, --kl-tokens (read only with more than one candidate). The library keeps Proxy
  // (its bundles byte-identical to before). kl_seqs: the first N selection sequences (0 = all); kl_tokens: the first
  // T tokens of each (0 = all), which must reach beyond sink + recent.
  CandidateMetric candidate_metric = CandidateMetric::Proxy;
  int64_t kl_seqs = 0;
  int64_t kl_tokens = 0;
  // The model the Kl forwards run on (not owned; required for Kl). Always the CPU reference forward, whatever device
  // ran the statistics, so the numbers are the ones `oscar eval --device cpu` reports.
  model::CpuModel* kl_model = nullptr;
  double k_weight = 0;                             // > 0: fixed (--k-weight); 0: chosen from k_weight_grid
  std::vector<double> k_weight_grid = {1, 2, 4, 8};
  int64_t fit_tokens = 2048;                       // per KV head, strided subsample of the fit samples
  int64_t proxy_queries = 256;                     // per selection sequence and layer
  // Each candidate layer's K/V clip ratios (--no-clip-tuning, --clip-objective, --clip-min/max/step):
  //   tune_clip false        the reference ratios (--k-clip / --v-clip) for every layer
  //   LogitMse               SpectralOptions::clip_grid minimizing J on the fit samples (the layout search's own)
  //   Attention              clip_grid minimizing the attention objective (clip_tuner.h) on `clip_sequences`
  bool tune_clip = true;
  ClipObjective clip_objective = ClipObjective::LogitMse;
  ClipGrid clip_grid;
  float k_reference = 0.96f, v_reference = 0.92f;
  int64_t clip_queries = 128;
};

// The smallest head vector pair a spectral layout can store: K and V each one `align`-wide segment at the smallest
// positive width, plus its fp16 scale and zero. A budget below it (e.g. 2.28 bits/element at head_dim 8, where the
// metadata alone costs 4 bits/element) is an oscar::Error naming --budget-bits.
int64_t spectral_align(int64_t head_dim);
void validate_spectral_options(const SpectralCalibrationOptions& options, int64_t head_dim);

struct SpectralCandidate {
  double k_weight = 0;
  std::vector<LayerChoice> layers;
  std::vector<double> proxy;  // per layer relative attention-output error on the selection sequences
  double proxy_mean = 0;
};
struct SpectralCalibration {
  std::vector<SpectralCandidate> candidates;  // the grid in order (one entry when k_weight is fixed)
  size_t chosen = 0;                          // least proxy_mean; ties to the earlier grid entry
  const SpectralCandidate& best() const { return candidates[chosen]; }
};
// fit: per layer held-out samples of the fit sequences; select: [layer][sequence] of the selection sequences
// (may be empty only with a fixed k_weight). windows: sink / recent of the cache.
// clip: [layer][sequence] held-out sequences for the attention clip objective (only read with tune_clip and
// ClipObjective::Attention; their kept query rows must be scored_query_positions(.., clip_queries)).
SpectralCalibration spectral_calibration(const std::vector<HeldoutLayer>& fit,
                                         const std::vector<std::vector<AttentionSequence>>& select,
                                         int64_t num_heads, const fmt::KvQuantSpec& windows,
                                         const SpectralCalibrationOptions& options,
                                         const std::vector<std::vector<AttentionSequence>>& clip = {});

// The per-layer choice among LayerCandidates, scored by attention_output_error on the selection sequences.
struct LayerSelection {
  std::vector<LayerCandidate> candidates;      // those scored, in the order given (unavailable ones left out)
  std::vector<std::string> skipped;            // "hadamard (head_dim 12 is not a power of two)", ...
  std::vector<std::vector<double>> proxy;      // [candidate][layer] relative attention-output error
  std::vector<std::vector<char>> whole_head;   // [candidate][layer]
  std::vector<size_t> chosen;                  // [layer] index into candidates
  // Set by choose_layers_by_kl: the metric the choice used and, for Kl, [candidate][layer] the KL beyond the window
  // of the bundle with layer l as candidate c and every other layer at its choice when layer l was visited.
  CandidateMetric metric = CandidateMetric::Proxy;
  std::vector<std::vector<double>> kl;
  double kl_start = 0;  // KL of the starting assignment (the proxy's choice)
  double kl_final = 0;  // KL of the chosen assignment
  LayerCandidate chosen_kind(size_t layer) const { return candidates[chosen[layer]]; }
};
// layers[c][l]: candidate c's bundle layer l (over `global`, rotation groups 1). proxy_of[c]: when non-empty, the
// already known per-layer proxy of candidate c (the spectral candidate's, from spectral_calibration()).
LayerSelection select_layer_candidates(const std::vector<LayerCandidate>& candidates,
                                       const std::vector<std::vector<fmt::LayerCalibration>>& layers,
                                       const std::vector<std::vector<double>>& proxy_of,
                                       const std::vector<std::vector<AttentionSequence>>& select, int64_t num_heads,
                                       const fmt::KvQuantSpec& global, int64_t proxy_queries, double tolerance);
// Provenance text: "published,spectral,..." (one per layer) and "spectral=a/b/..;published=../..;hadamard=.."
std::string layer_choice_text(const LayerSelection& s);
std::string layer_proxy_text(const LayerSelection& s);
// "spectral=a/b/..;hadamard=.." of s.kl (empty when the metric is Proxy).
std::string layer_kl_text(const LayerSelection& s);

// "0,1,2,3,4" / "1,2,4,8" — how the lists are written in the bundle's provenance and parsed from the CLI.
std::string join_numbers(std::span<const double> xs);
std::string join_numbers(std::span<const int32_t> xs);

}  // namespace oscar::calib
