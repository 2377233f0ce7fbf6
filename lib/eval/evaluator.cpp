#include "lib/eval/evaluator.h"

#include <map>

#include <fmt/format.h>

#include <algorithm>

#include "formats/error.h"
#include "lib/eval/simulated_attention.h"
#include "lib/model/generate.h"

namespace oscar::eval {

std::vector<float> simulated_logits(model::CpuModel& model, const CacheFormat& format, std::span<const int32_t> ids) {
  SimulatedCacheAttention backend(format);
  model::KvCache cache(model.config(), static_cast<int64_t>(ids.size()));
  model::ForwardOptions fo;
  fo.attention = &backend;
  return model.forward(ids, cache, fo);
}

std::vector<int32_t> simulated_greedy(model::CpuModel& model, const CacheFormat& format,
                                      std::span<const int32_t> prompt, int64_t new_tokens) {
  SimulatedCacheAttention backend(format);
  model::GenerateOptions g;
  g.max_new_tokens = new_tokens;
  g.stop_at_eos = false;
  g.forward.attention = &backend;
  return model::generate(model, prompt, g).tokens;
}

ModeResult summarize_mode(const CacheFormat& format, int64_t context, int64_t sequences,
                          std::span<const PositionMetrics> positions, CacheWindows windows,
                          std::span<const int64_t> greedy_agreement, int64_t greedy_tokens) {
  ModeResult r;
  r.mode = std::string(format.name());
  r.context = context;
  r.sequences = sequences;
  r.all = summarize(positions);
  // Position t of a sequence sits at index s * (context - 1) + t of the concatenation.
  const int64_t beyond_from = windows.sink + windows.recent;
  std::vector<PositionMetrics> beyond;
  const int64_t per_seq = context - 1;
  for (size_t i = 0; i < positions.size(); ++i)
    if (static_cast<int64_t>(i) % per_seq >= beyond_from) beyond.push_back(positions[i]);
  r.beyond = summarize(beyond);
  r.greedy_prompts = static_cast<int64_t>(greedy_agreement.size());
  r.greedy_tokens = greedy_tokens;
  if (!greedy_agreement.empty()) {
    int64_t sum = 0;
    for (int64_t a : greedy_agreement) {
      sum += a;
      r.greedy_full_matches += a == greedy_tokens ? 1 : 0;
    }
    r.greedy_mean_agreement = static_cast<double>(sum) / static_cast<double>(greedy_agreement.size());
  }
  r.footprint = kv_footprint(format, context);
  return r;
}

uint64_t retrieval_prompt_seed(uint64_t seed, RetrievalTask task, int64_t length, size_t depth_index, int64_t trial) {
  return seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(task == RetrievalTask::Needle) +
         2 * (static_cast<uint64_t>(length) * 1000003ull + depth_index * 7919ull + static_cast<uint64_t>(trial));
}

int64_t key_table_context_at(const EvalOptions& o, int64_t positions) {
  const fmt::Bundle* b = o.mode_options.bundle;
  if (o.key_tables_per_context && b && fmt::has_key_metric(*b)) return positions;
  return o.mode_options.key_table_context;
}

EvalReport evaluate(model::CpuModel& model, const fmt::Tokenizer* tokenizer, const std::vector<ContextSequences>& data,
                    const EvalOptions& o) {
  const fmt::ModelConfig& cfg = model.config();
  auto say = [&](const std::string& line) {
    if (o.progress) o.progress(line);
  };
  // Build every format first, so a mode that cannot exist fails before minutes of forward passes.
  const auto reference = CacheFormat::create(CacheMode::BF16, cfg, o.mode_options);
  std::vector<std::unique_ptr<CacheFormat>> formats;
  for (CacheMode m : o.modes) formats.push_back(CacheFormat::create(m, cfg, o.mode_options));
  // The oscar format with its key tables for `positions` (--ef-context auto), built once per length.
  std::map<std::pair<size_t, int64_t>, std::unique_ptr<CacheFormat>> per_length;
  auto format_at = [&](size_t mi, int64_t positions) -> const CacheFormat& {
    if (o.modes[mi] != CacheMode::Oscar || !o.key_tables_per_context) return *formats[mi];
    const int64_t tables = key_table_context_at(o, positions);
    if (tables == o.mode_options.key_table_context) return *formats[mi];
    auto& f = per_length[{mi, positions}];
    if (!f) {
      ModeOptions mo = o.mode_options;
      mo.key_table_context = tables;
      f = CacheFormat::create(o.modes[mi], cfg, mo);
    }
    return *f;
  };
  if (o.greedy_prompts < 0 || o.greedy_tokens < 0) throw Error("--greedy-prompts", "must be >= 0");
  if (o.retrieval && !tokenizer) throw Error("--passkey", "retrieval needs the model's tokenizer");

  const CacheWindows w = o.mode_options.windows;
  const int64_t vocab = cfg.vocab_size;
  EvalReport report;

  for (const auto& ctx : data) {
    std::vector<std::vector<PositionMetrics>> per_mode(formats.size());
    for (size_t s = 0; s < ctx.sequences.size(); ++s) {
      const auto& ids = ctx.sequences[s];
      if (static_cast<int64_t>(ids.size()) != ctx.context)
        throw Error("evaluate", ::fmt::format("sequence {} has {} tokens, context is {}", s, ids.size(), ctx.context));
      say(::fmt::format("context {}: sequence {}/{} bf16 reference", ctx.context, s + 1, ctx.sequences.size()));
      const std::vector<float> ref = simulated_logits(model, *reference, ids);
      const std::span<const int32_t> targets(ids.data() + 1, ids.size() - 1);
      for (size_t mi = 0; mi < formats.size(); ++mi) {
        std::vector<PositionMetrics> pm;
        if (formats[mi]->mode() == CacheMode::BF16) {
          pm = compare_positions(ref, ref, vocab, targets);
        } else {
          say(::fmt::format("context {}: sequence {}/{} {}", ctx.context, s + 1, ctx.sequences.size(),
                            formats[mi]->name()));
          pm = compare_positions(ref, simulated_logits(model, format_at(mi, ctx.context), ids), vocab, targets);
        }
        per_mode[mi].insert(per_mode[mi].end(), pm.begin(), pm.end());
      }
    }

    // Greedy continuations from the first prompts of this context.
    const int64_t prompts = std::min<int64_t>(o.greedy_prompts, static_cast<int64_t>(ctx.sequences.size()));
    const int64_t prompt_len = ctx.context - o.greedy_tokens;
    std::vector<std::vector<int64_t>> agreement(formats.size());
    if (o.greedy_tokens > 0 && prompt_len > 0) {
      for (int64_t p = 0; p < prompts; ++p) {
        const std::span<const int32_t> prompt(ctx.sequences[p].data(), static_cast<size_t>(prompt_len));
        say(::fmt::format("context {}: greedy prompt {}/{}", ctx.context, p + 1, prompts));
        const auto ref_tokens = simulated_greedy(model, *reference, prompt, o.greedy_tokens);
        for (size_t mi = 0; mi < formats.size(); ++mi) {
          const auto tokens = formats[mi]->mode() == CacheMode::BF16
                                  ? ref_tokens
                                  : simulated_greedy(model, format_at(mi, ctx.context), prompt, o.greedy_tokens);
          agreement[mi].push_back(tokens_until_divergence(ref_tokens, tokens));
        }
      }
    }

    for (size_t mi = 0; mi < formats.size(); ++mi)
      report.results.push_back(summarize_mode(*formats[mi], ctx.context, static_cast<int64_t>(ctx.sequences.size()),
                                              per_mode[mi], w, agreement[mi], o.greedy_tokens));
  }

  if (o.retrieval) {
    for (RetrievalTask task : {RetrievalTask::Passkey, RetrievalTask::Needle}) {
      for (int64_t length : o.retrieval_lengths) {
        if (cfg.max_position_embeddings > 0 && length + o.retrieval_new_tokens > cfg.max_position_embeddings) {
          report.warnings.push_back(::fmt::format("{} length {} + {} new tokens exceeds the model's {} positions: skipped",
                                                  retrieval_task_name(task), length, o.retrieval_new_tokens,
                                                  cfg.max_position_embeddings));
          continue;
        }
        for (size_t di = 0; di < o.retrieval_depths.size(); ++di) {
          std::vector<RetrievalCell> cells(formats.size());
          for (size_t mi = 0; mi < formats.size(); ++mi)
            cells[mi] = {std::string(formats[mi]->name()), std::string(retrieval_task_name(task)), length,
                         o.retrieval_depths[di], 0, 0};
          for (int64_t trial = 0; trial < o.retrieval_trials; ++trial) {
            // One key per (task, length, depth, trial), all derived from --seed.
            const uint64_t seed = retrieval_prompt_seed(o.seed, task, length, di, trial);
            const RetrievalPrompt prompt =
                make_retrieval_prompt(*tokenizer, task, length, o.retrieval_depths[di], seed);
            say(::fmt::format("{} length {} depth {:.0f}% trial {}", retrieval_task_name(task), length,
                              100 * o.retrieval_depths[di], trial + 1));
            for (size_t mi = 0; mi < formats.size(); ++mi) {
              // The cache holds the prompt and the answer's tokens: the tables for that many positions.
              const int64_t positions = length + o.retrieval_new_tokens;
              const auto tokens =
                  simulated_greedy(model, format_at(mi, positions), prompt.ids, o.retrieval_new_tokens);
              cells[mi].trials += 1;
              cells[mi].successes += retrieval_success(tokenizer->decode(tokens), prompt.answer) ? 1 : 0;
            }
          }
          report.retrieval.insert(report.retrieval.end(), cells.begin(), cells.end());
        }
      }
    }
  }
  return report;
}

}  // namespace oscar::eval
