#pragma once
// calib::StatisticsCollector — the attention-aware second moments OSCAR's rotations come from, gathered as a
// model::Observer during the calibration forward passes (docs/method.md has the math).
//
// Per layer and KV head h (group G(h) = the query heads sharing h):
//   Σ_Q[h] = (1/N_q) Σ_{i∈G(h)} Σ_t q_{i,t} q_{i,t}ᵀ                          (post-RoPE queries)
//   Σ_V[h] = Σ_t w_t v_t v_tᵀ / Σ_t w_t, with w_t per ValueWeighting:
//     QueryEnergy    w_t = k_tᵀ Σ_Q[h] k_t  (the published "sst"; Σ_Q from ALL calibration data, so this mode
//                    needs a second pass: run every sequence, start_value_pass(), run every sequence again)
//     AttentionMass  w_t = total softmax probability key t receives from the causal queries of its group
//                    (one pass; each sequence must reach the observer in one call starting at position 0)
//     Uniform        w_t = 1 (one pass)
// The layer-shared moments (the default rotation) are the mean over KV heads of the per-head moments.
//
// Determinism: everything is accumulated in fp64 in a fixed order within a sequence, and sequences are combined
// along a fixed binary tree keyed by their global index (pairwise sums of aligned index blocks). The result
// depends only on the set of sequence indices and their data — not on arrival order or on how the sequences were
// split between collectors — so merge() of two halves is bit-identical to a single pass, and a multi-GPU run
// reproduces a single-GPU bundle byte for byte.
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/model_config.h"
#include "lib/model/observer.h"

namespace oscar::calib {

enum class ValueWeighting : uint8_t { QueryEnergy = 0, AttentionMass = 1, Uniform = 2 };
std::string_view value_weighting_name(ValueWeighting w);  // "query", "attention_mass", "uniform"
ValueWeighting parse_value_weighting(std::string_view name, const std::string& where);

struct StatisticsShape {
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  static StatisticsShape from_config(const fmt::ModelConfig& cfg);
  bool operator==(const StatisticsShape&) const = default;
};

// mass[t] (t < T) = Σ_{i ∈ G(kv_head)} Σ_{s ≥ t} softmax_t(q_{i,s} · k_{·} / √d): the attention probability key t
// receives from every causal query of the call. Requires in.pos0 == 0 (the whole sequence in one call).
// Computed in fp64; per query head in parallel, then summed in head order (deterministic).
void attention_mass(const model::AttentionInputs& in, int64_t kv_head, std::span<double> mass);

// Normalized moments of one KV head (or the layer mean).
struct HeadMoments {
  std::vector<double> sigma_q;  // [d, d] Σ_Q
  std::vector<double> sigma_v;  // [d, d] Σ_V
  double query_vectors = 0;     // N_q (query heads × tokens)
  double value_tokens = 0;      // tokens in Σ_V
  double value_weight = 0;      // Σ_t w_t
};

// The mean of a layer's per-KV-head moments, head_moments(h) for h = 0 .. num_kv_heads-1: Σ_Q and Σ_V summed head by
// head, each scaled by 1/Hkv, counts added. One order for the CPU and GPU collectors, so their bundles are
// byte-identical.
template <class HeadMomentsOf>
HeadMoments mean_head_moments(int64_t num_kv_heads, HeadMomentsOf&& head_moments) {
  HeadMoments mean;
  const double inv = 1.0 / static_cast<double>(num_kv_heads);
  for (int64_t h = 0; h < num_kv_heads; ++h) {
    const HeadMoments m = head_moments(h);
    if (h == 0) {
      mean.sigma_q.assign(m.sigma_q.size(), 0.0);
      mean.sigma_v.assign(m.sigma_v.size(), 0.0);
    }
    for (size_t i = 0; i < m.sigma_q.size(); ++i) {
      mean.sigma_q[i] += m.sigma_q[i] * inv;
      mean.sigma_v[i] += m.sigma_v[i] * inv;
    }
    mean.query_vectors += m.query_vectors;
    mean.value_tokens += m.value_tokens;
    mean.value_weight += m.value_weight;
  }
  return mean;
}

class StatisticsCollector : public model::Observer {
 public:
  enum class Pass : uint8_t { Queries = 0, Values = 1 };

  StatisticsCollector(const StatisticsShape& shape, ValueWeighting weighting);

  const StatisticsShape& shape() const { return shape_; }
  ValueWeighting weighting() const { return weighting_; }
  Pass pass() const { return pass_; }

  // Opens sequence `index` (its global position in the calibration set; any order, each index at most once per
  // pass). Closes the previous one. Every on_attention_inputs call belongs to the open sequence.
  void begin_sequence(int64_t index);
  // Folds the open sequence (if any) into the reduction tree.
  void finish_sequence();
  void on_attention_inputs(const model::AttentionInputs& in) override;

  // QueryEnergy only: true until start_value_pass() was called.
  bool needs_value_pass() const { return weighting_ == ValueWeighting::QueryEnergy && pass_ == Pass::Queries; }
  // Freezes Σ_Q (from every sequence seen so far, including merged collectors) as the value weighting and starts
  // collecting Σ_V; feed the same sequences again.
  void start_value_pass();

  // Sequences folded in the current pass, and whether `index` is one of them (resume skips those).
  int64_t num_sequences() const;
  bool contains_sequence(int64_t index) const;
  // Adds `other` (same shape, weighting and pass; disjoint sequence indices; in the value pass the same frozen
  // Σ_Q). Throws oscar::Error otherwise.
  void merge(const StatisticsCollector& other);

  // Normalized moments (finishes the open sequence). Throws if nothing was collected or, with QueryEnergy,
  // before the value pass.
  HeadMoments head_moments(int64_t layer, int64_t kv_head);
  HeadMoments layer_moments(int64_t layer);  // mean over the layer's KV heads

  // A self-describing binary image for --resume checkpoints (finishes the open sequence); deserialize validates
  // it and throws oscar::Error(where, ...) when truncated or inconsistent.
  std::string serialize();
  static StatisticsCollector deserialize(std::string_view bytes, const std::string& where);

 private:
  // Per (layer, kv head) slot in a payload: [Σqqᵀ d², N_q, Σw vvᵀ d², Σw, N_v].
  int64_t slot_size() const { return 2 * shape_.head_dim * shape_.head_dim + 3; }
  int64_t slot_offset(int64_t layer, int64_t head) const { return (layer * shape_.num_kv_heads + head) * slot_size(); }
  int64_t payload_size() const { return shape_.num_layers * shape_.num_kv_heads * slot_size(); }
  // Aligned block [start, start + 2^level) of sequence indices -> the sum of their payloads.
  struct BlockKey {
    int64_t start;
    int32_t level;
    bool operator<(const BlockKey& o) const { return start < o.start; }
  };
  void insert_block(BlockKey key, std::vector<double> payload);
  std::vector<double> reduced() const;
  const std::vector<double>& totals();  // the reduced tree (cached until the tree changes)

  StatisticsShape shape_;
  ValueWeighting weighting_;
  Pass pass_ = Pass::Queries;
  std::map<BlockKey, std::vector<double>> blocks_;
  int64_t open_index_ = -1;
  std::vector<double> open_;           // the open sequence's payload
  std::vector<double> query_result_;   // value pass: the reduced payload of the query pass
  std::vector<double> frozen_sigma_q_;  // value pass: Σ_Q per (layer, head), [L, Hkv, d, d]
  std::vector<double> totals_;
  std::vector<double> scratch_;
};

}  // namespace oscar::calib
