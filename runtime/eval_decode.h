#pragma once
// The measurements of `oscar eval` (lib/eval/evaluator.h) driven through a decode engine instead of the CPU
// simulation: every position of every sequence goes through the engine's decode step, exactly like serving.
//
//   * teacher-forced metrics: each sequence is prefilled with a short prefix (--prefill-tokens, at most the sink
//     window, so no prefill query would have read a quantized token), then fed one true token per step with
//     Decoder::set_next_token; the logits of every step are compared with the bf16 reference engine's logits of
//     the same step (eval::compare_positions), and summarized with eval::summarize_mode — the CPU path's code;
//   * greedy agreement: the prompt is fed the same way, then every engine continues with its own greedy picks;
//   * passkey / needle: the prompts of eval::make_retrieval_prompt (seeds from eval::retrieval_prompt_seed), fed
//     the same way, then greedy tokens decoded and judged by eval::retrieval_success.
// The reference and every mode's engine run in lockstep (the same sequences admitted, stepped and freed together),
// so a step's logits of all formats are compared while they are in host memory and nothing of size
// positions x vocab is ever stored. Up to `batch` sequences are live at once; a finished one is replaced by the
// next job at once (continuous batching), so the decode batch stays full until the queue drains.
//
// This file is plain host C++: the engine is behind the Decoder interface (rt::Engine implements it in
// runtime/eval_gpu.cpp; tests plug in the CPU simulation), so the driver is tested without a GPU.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/model_config.h"
#include "formats/tokenizer.h"
#include "lib/eval/evaluator.h"
#include "runtime/engine.h"

namespace oscar::rt {

// What the evaluation needs from a decode engine: prefill, greedy picks, teacher forcing by overriding the next
// token, and each live sequence's last logits. Sequence ids are the decoder's own.
class Decoder {
 public:
  virtual ~Decoder() = default;
  // Prefills `prompt` (non-empty) as a new sequence: last_logits is then the row of its last token and
  // next_token the greedy pick from it.
  virtual int64_t add_sequence(std::span<const int32_t> prompt) = 0;
  // Every row [prompt.size(), vocab] of a prefill of `prompt`, creating no sequence.
  virtual std::vector<float> prefill_logits(std::span<const int32_t> prompt) = 0;
  virtual int32_t next_token(int64_t seq) const = 0;
  virtual void set_next_token(int64_t seq, int32_t token) = 0;
  // Feeds every live sequence its next_token; last_logits / next_token then belong to the new position.
  virtual void step() = 0;
  // Valid until the next add_sequence, step or free_sequence.
  virtual std::span<const float> last_logits(int64_t seq) const = 0;
  virtual void free_sequence(int64_t seq) = 0;
  // --ef-context auto: called with no live sequence before a run whose caches hold up to `positions` tokens; a
  // decoder whose cache has error-feedback key tables rebuilt from a stored key metric rebuilds them for that many
  // positions (Engine::set_key_table_context). Others ignore it.
  virtual void use_key_tables_for(int64_t /*positions*/) {}
};

struct DecodeScheduleOptions {
  int64_t batch = 8;           // --gpu-batch: sequences live (decoded together) at once
  int64_t prefill_tokens = 1;  // --prefill-tokens: prefix prefilled before decoding, 1 .. max(sink, 1)
};

// One sequence of work: ids[0, P) prefilled (P = min(prefill_tokens, ids.size())), ids[P..] fed one per step,
// then new_tokens greedy tokens.
struct DecodeJob {
  std::span<const int32_t> ids;  // non-empty; must outlive run_lockstep
  int64_t new_tokens = 0;
  bool want_rows = false;  // report the logits rows of positions 0 .. ids.size()-1
  // Cache tokens the job occupies at its longest.
  int64_t cache_tokens() const {
    return static_cast<int64_t>(ids.size()) + (new_tokens > 0 ? new_tokens - 1 : 0);
  }
};

// Logits of one position of one job, from every decoder: logits[d] is decoder d's distribution of token
// position + 1 after ids[0 .. position] were fed.
struct DecodedRow {
  size_t job = 0;
  int64_t position = 0;
  std::vector<std::span<const float>> logits;
};

// Runs `jobs` through every decoder in lockstep, admitting them in order while fewer than options.batch are live.
// `on_rows` sees the rows of each prefill and each step (all jobs together; the spans are valid during the call).
// Returns the greedy tokens: [job][decoder] -> new_tokens ids. Throws oscar::Error for an empty job or options
// outside their ranges (prefill_tokens >= 1, batch >= 1).
std::vector<std::vector<std::vector<int32_t>>> run_lockstep(
    std::span<Decoder* const> decoders, std::span<const DecodeJob> jobs, const DecodeScheduleOptions& options,
    const std::function<void(std::span<const DecodedRow>)>& on_rows);

// evaluate() through decoders: `reference` decodes with the bf16 cache; mode_decoders[i] decodes options.modes[i]
// (it may be `reference` itself for the bf16 mode). Contexts, modes and retrieval cells come out in evaluate()'s
// order, with the same ModeResult / RetrievalCell definitions. options.mode_options must build every mode's
// eval::CacheFormat (footprints; the oscar bundle is needed). Rows are compared in parallel (TBB), each metric
// into its own slot, so results do not depend on the thread count.
eval::EvalReport evaluate_with_decoders(const fmt::ModelConfig& cfg, const fmt::Tokenizer* tokenizer,
                                        const std::vector<eval::ContextSequences>& data,
                                        const eval::EvalOptions& options, Decoder& reference,
                                        std::span<Decoder* const> mode_decoders,
                                        const DecodeScheduleOptions& schedule);

// ---- GPU planning (host parts of runtime/eval_gpu.h)

// The engine cache format of an eval mode, or nullopt for the modes only the CPU simulation implements
// (kivi2).
std::optional<CacheMode> engine_cache_mode(eval::CacheMode mode);

struct ModeSplit {
  std::vector<eval::CacheMode> engine;    // in the given order
  std::vector<eval::CacheMode> cpu_only;  // in the given order
};
ModeSplit split_engine_modes(std::span<const eval::CacheMode> modes);

// The longest cache a job of this evaluation reaches (teacher-forced sequences, greedy prompts, retrieval prompts
// plus their answers), in tokens.
int64_t max_eval_cache_tokens(const std::vector<eval::ContextSequences>& data, const eval::EvalOptions& options);

// Bytes of a KV cache (runtime/kv_cache.h plan_kv_cache) that holds `batch` sequences of `max_tokens` tokens in
// `format` at once: bf16 pages for every token (bf16 format), else the sink/window bf16 pages plus an INT2 page
// for every logical page of each sequence.
size_t eval_cache_budget_bytes(const fmt::ModelConfig& cfg, const CacheFormat& format, int64_t batch,
                               int64_t max_tokens);

// Checks the schedule against the windows: batch >= 1 and 1 <= prefill_tokens <= max(sink, 1), so that every
// position a quantized read could reach goes through the decode kernel. oscar::Error names the flag.
void check_schedule(const DecodeScheduleOptions& schedule, const eval::CacheWindows& windows);

// One report from a GPU report and a CPU report of the same data and options (disjoint modes): results ordered by
// context, then options.modes; retrieval cells by task, length, depth, then options.modes; warnings of both,
// each once.
eval::EvalReport merge_reports(const eval::EvalReport& a, const eval::EvalReport& b,
                               const std::vector<eval::ContextSequences>& data, const eval::EvalOptions& options);

}  // namespace oscar::rt
