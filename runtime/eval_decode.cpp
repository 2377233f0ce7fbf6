// The decode-engine driver of `oscar eval` (runtime/eval_decode.h). Plain host C++: builds and is tested without
// CUDA; runtime/eval_gpu.cpp plugs rt::Engine in.
#include "runtime/eval_decode.h"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <memory>
#include <set>
#include <tuple>
#include <utility>

#include <fmt/format.h>

#include "formats/error.h"
#include "formats/kv_layout.h"
#include "runtime/kv_cache.h"

namespace oscar::rt {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One job in flight: its sequence id in every decoder, how many of its ids the cache holds, and its greedy tokens.
struct LiveJob {
  size_t job = 0;
  std::vector<int64_t> seq;  // per decoder
  int64_t fed = 0;
  std::vector<std::vector<int32_t>> generated;  // per decoder
};

}  // namespace

std::vector<std::vector<std::vector<int32_t>>> run_lockstep(
    std::span<Decoder* const> decoders, std::span<const DecodeJob> jobs, const DecodeScheduleOptions& options,
    const std::function<void(std::span<const DecodedRow>)>& on_rows) {
  const std::string where = "run_lockstep";
  if (decoders.empty()) throw Error(where, "no decoders");
  if (options.batch < 1) throw Error("--gpu-batch", "must be >= 1");
  if (options.prefill_tokens < 1) throw Error("--prefill-tokens", "must be >= 1");
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (jobs[j].ids.empty()) throw Error(where, ::fmt::format("job {} has no tokens", j));
    if (jobs[j].new_tokens < 0) throw Error(where, ::fmt::format("job {} asks for a negative token count", j));
  }
  const size_t D = decoders.size();
  std::vector<std::vector<std::vector<int32_t>>> result(jobs.size(), std::vector<std::vector<int32_t>>(D));
  std::vector<LiveJob> live;
  size_t next_job = 0;
  std::vector<DecodedRow> rows;
  // Rows 0 .. P-2 of a prefill come from a separate all-rows prefill; they are kept here for the callback.
  std::vector<std::vector<std::vector<float>>> prefix_rows;

  // After a prefill or a step fed job ids[0 .. fed): record a greedy pick once the forced ids are all in.
  auto collect = [&](LiveJob& lj) {
    const DecodeJob& job = jobs[lj.job];
    if (lj.fed < static_cast<int64_t>(job.ids.size())) return;
    if (static_cast<int64_t>(lj.generated[0].size()) >= job.new_tokens) return;
    for (size_t d = 0; d < D; ++d) lj.generated[d].push_back(decoders[d]->next_token(lj.seq[d]));
  };
  auto done = [&](const LiveJob& lj) {
    const DecodeJob& job = jobs[lj.job];
    return lj.fed >= static_cast<int64_t>(job.ids.size()) &&
           static_cast<int64_t>(lj.generated[0].size()) >= job.new_tokens;
  };
  auto row_of = [&](const LiveJob& lj, int64_t position) {
    DecodedRow r;
    r.job = lj.job;
    r.position = position;
    for (size_t d = 0; d < D; ++d) r.logits.push_back(decoders[d]->last_logits(lj.seq[d]));
    return r;
  };
  auto retire_finished = [&] {
    for (size_t i = 0; i < live.size();) {
      if (!done(live[i])) {
        ++i;
        continue;
      }
      for (size_t d = 0; d < D; ++d) decoders[d]->free_sequence(live[i].seq[d]);
      result[live[i].job] = std::move(live[i].generated);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
    }
  };

  while (next_job < jobs.size() || !live.empty()) {
    // Admit jobs while there is room; a job that is complete after its prefill leaves at once.
    while (next_job < jobs.size() && static_cast<int64_t>(live.size()) < options.batch) {
      const DecodeJob& job = jobs[next_job];
      const auto P = std::min<int64_t>(options.prefill_tokens, static_cast<int64_t>(job.ids.size()));
      const std::span<const int32_t> prefix = job.ids.first(static_cast<size_t>(P));
      LiveJob lj;
      lj.job = next_job++;
      lj.generated.resize(D);
      rows.clear();
      prefix_rows.clear();
      if (job.want_rows && P > 1) {
        for (size_t d = 0; d < D; ++d) {
          std::vector<float> all = decoders[d]->prefill_logits(prefix.first(static_cast<size_t>(P - 1)));
          prefix_rows.push_back({});
          const size_t vocab = all.size() / static_cast<size_t>(P - 1);
          for (int64_t t = 0; t < P - 1; ++t)
            prefix_rows.back().emplace_back(all.begin() + static_cast<std::ptrdiff_t>(t * vocab),
                                            all.begin() + static_cast<std::ptrdiff_t>((t + 1) * vocab));
        }
      }
      for (size_t d = 0; d < D; ++d) lj.seq.push_back(decoders[d]->add_sequence(prefix));
      lj.fed = P;
      if (job.want_rows) {
        for (int64_t t = 0; t < P - 1; ++t) {
          DecodedRow r;
          r.job = lj.job;
          r.position = t;
          for (size_t d = 0; d < D; ++d) r.logits.emplace_back(prefix_rows[d][static_cast<size_t>(t)]);
          rows.push_back(std::move(r));
        }
        rows.push_back(row_of(lj, P - 1));
        if (on_rows) on_rows(rows);
      }
      collect(lj);
      live.push_back(std::move(lj));
      retire_finished();
    }
    if (live.empty()) continue;

    // Teacher forcing: a job still inside its ids is fed the true next id; afterwards the decoder's own pick.
    for (const LiveJob& lj : live) {
      const DecodeJob& job = jobs[lj.job];
      if (lj.fed < static_cast<int64_t>(job.ids.size()))
        for (size_t d = 0; d < D; ++d) decoders[d]->set_next_token(lj.seq[d], job.ids[static_cast<size_t>(lj.fed)]);
    }
    for (Decoder* d : decoders) d->step();
    rows.clear();
    for (LiveJob& lj : live) {
      const DecodeJob& job = jobs[lj.job];
      lj.fed += 1;
      if (job.want_rows && lj.fed <= static_cast<int64_t>(job.ids.size())) rows.push_back(row_of(lj, lj.fed - 1));
      collect(lj);
    }
    if (on_rows && !rows.empty()) on_rows(rows);
    retire_finished();
  }
  return result;
}

// ---------------------------------------------------------------------------------------------------------------

eval::EvalReport evaluate_with_decoders(const fmt::ModelConfig& cfg, const fmt::Tokenizer* tokenizer,
                                        const std::vector<eval::ContextSequences>& data,
                                        const eval::EvalOptions& o, Decoder& reference,
                                        std::span<Decoder* const> mode_decoders,
                                        const DecodeScheduleOptions& schedule) {
  const std::string where = "evaluate_with_decoders";
  if (mode_decoders.size() != o.modes.size())
    throw Error(where, ::fmt::format("{} decoders for {} modes", mode_decoders.size(), o.modes.size()));
  auto say = [&](const std::string& line) {
    if (o.progress) o.progress(line);
  };
  // Formats first, as evaluate() does: a mode that cannot exist fails before any decoding.
  std::vector<std::unique_ptr<eval::CacheFormat>> formats;
  for (eval::CacheMode m : o.modes) formats.push_back(eval::CacheFormat::create(m, cfg, o.mode_options));
  if (o.greedy_prompts < 0 || o.greedy_tokens < 0) throw Error("--greedy-prompts", "must be >= 0");
  if (o.retrieval && !tokenizer) throw Error("--passkey", "retrieval needs the model's tokenizer");
  check_schedule(schedule, o.mode_options.windows);

  // Decoders stepped in lockstep: the reference first, then each distinct mode decoder once.
  std::vector<Decoder*> decoders{&reference};
  std::vector<size_t> decoder_of_mode;
  for (Decoder* d : mode_decoders) {
    if (!d) throw Error(where, "null decoder");
    auto it = std::find(decoders.begin(), decoders.end(), d);
    if (it == decoders.end()) {
      decoders.push_back(d);
      it = decoders.end() - 1;
    }
    decoder_of_mode.push_back(static_cast<size_t>(it - decoders.begin()));
  }

  const eval::CacheWindows w = o.mode_options.windows;
  const int64_t vocab = cfg.vocab_size;
  const size_t M = o.modes.size();
  eval::EvalReport report;

  for (const auto& ctx : data) {
    const size_t S = ctx.sequences.size();
    const int64_t per_seq = ctx.context - 1;
    if (ctx.context < 2) throw Error("--context", ::fmt::format("{} leaves no position to score", ctx.context));
    for (size_t s = 0; s < S; ++s)
      if (static_cast<int64_t>(ctx.sequences[s].size()) != ctx.context)
        throw Error("evaluate", ::fmt::format("sequence {} has {} tokens, context is {}", s, ctx.sequences[s].size(),
                                              ctx.context));
    // Teacher-forced jobs feed ids[0 .. context-2]; row t predicts ids[t+1]. Greedy jobs follow in the same run.
    std::vector<DecodeJob> jobs;
    for (const auto& ids : ctx.sequences)
      jobs.push_back({std::span<const int32_t>(ids).first(static_cast<size_t>(per_seq)), 0, true});
    const int64_t prompts = std::min<int64_t>(o.greedy_prompts, static_cast<int64_t>(S));
    const int64_t prompt_len = ctx.context - o.greedy_tokens;
    const bool greedy = o.greedy_tokens > 0 && prompt_len > 0 && prompts > 0;
    if (greedy)
      for (int64_t p = 0; p < prompts; ++p)
        jobs.push_back({std::span<const int32_t>(ctx.sequences[static_cast<size_t>(p)])
                            .first(static_cast<size_t>(prompt_len)),
                        o.greedy_tokens, false});

    // metrics[mode][sequence * per_seq + t]
    std::vector<std::vector<eval::PositionMetrics>> metrics(M, std::vector<eval::PositionMetrics>(S * per_seq));
    int64_t rows_done = 0;
    const int64_t rows_total = static_cast<int64_t>(S) * per_seq;
    int64_t next_report = 0;
    auto on_rows = [&](std::span<const DecodedRow> rows) {
      tbb::parallel_for(size_t{0}, rows.size() * M, [&](size_t i) {
        const DecodedRow& r = rows[i / M];
        const size_t mi = i % M;
        const int32_t target = ctx.sequences[r.job][static_cast<size_t>(r.position + 1)];
        metrics[mi][r.job * static_cast<size_t>(per_seq) + static_cast<size_t>(r.position)] =
            eval::compare_positions(r.logits[0], r.logits[decoder_of_mode[mi]], vocab,
                                    std::span<const int32_t>(&target, 1))[0];
      });
      rows_done += static_cast<int64_t>(rows.size());
      if (rows_done >= next_report) {
        say(::fmt::format("context {}: {}/{} positions decoded", ctx.context, rows_done, rows_total));
        next_report = rows_done + std::max<int64_t>(rows_total / 10, 1);
      }
    };
    say(::fmt::format("context {}: {} sequences{} through {} decoder(s), batch {}", ctx.context, S,
                      greedy ? ::fmt::format(" and {} greedy prompts", prompts) : std::string(), decoders.size(),
                      schedule.batch));
    if (o.key_tables_per_context)
      for (Decoder* d : decoders) d->use_key_tables_for(eval::key_table_context_at(o, ctx.context));
    const auto generated = run_lockstep(decoders, jobs, schedule, on_rows);

    std::vector<std::vector<int64_t>> agreement(M);
    if (greedy)
      for (int64_t p = 0; p < prompts; ++p) {
        const auto& g = generated[S + static_cast<size_t>(p)];
        for (size_t mi = 0; mi < M; ++mi)
          agreement[mi].push_back(eval::tokens_until_divergence(g[0], g[decoder_of_mode[mi]]));
      }
    for (size_t mi = 0; mi < M; ++mi)
      report.results.push_back(eval::summarize_mode(*formats[mi], ctx.context, static_cast<int64_t>(S), metrics[mi],
                                                    w, agreement[mi], o.greedy_tokens));
  }

  if (o.retrieval) {
    struct Cell {
      eval::RetrievalTask task;
      int64_t length;
      size_t depth;
    };
    std::vector<Cell> cells;
    std::vector<eval::RetrievalPrompt> prompts;
    std::vector<size_t> cell_of_prompt;
    for (eval::RetrievalTask task : {eval::RetrievalTask::Passkey, eval::RetrievalTask::Needle}) {
      for (int64_t length : o.retrieval_lengths) {
        if (cfg.max_position_embeddings > 0 && length + o.retrieval_new_tokens > cfg.max_position_embeddings) {
          report.warnings.push_back(::fmt::format("{} length {} + {} new tokens exceeds the model's {} positions: skipped",
                                                  eval::retrieval_task_name(task), length, o.retrieval_new_tokens,
                                                  cfg.max_position_embeddings));
          continue;
        }
        for (size_t di = 0; di < o.retrieval_depths.size(); ++di) {
          cells.push_back({task, length, di});
          for (int64_t trial = 0; trial < o.retrieval_trials; ++trial) {
            prompts.push_back(eval::make_retrieval_prompt(*tokenizer, task, length, o.retrieval_depths[di],
                                                          eval::retrieval_prompt_seed(o.seed, task, length, di, trial)));
            cell_of_prompt.push_back(cells.size() - 1);
          }
        }
      }
    }
    say(::fmt::format("retrieval: {} prompts through {} decoder(s)", prompts.size(), decoders.size()));
    // One lockstep run, or with --ef-context auto one per prompt length, each with the key tables for the positions
    // its caches hold (prompt + answer).
    std::vector<std::vector<std::vector<int32_t>>> generated(prompts.size());
    std::vector<int64_t> lengths;
    for (const Cell& c : cells)
      if (std::find(lengths.begin(), lengths.end(), c.length) == lengths.end()) lengths.push_back(c.length);
    if (!o.key_tables_per_context) lengths = {-1};
    for (const int64_t length : lengths) {
      std::vector<DecodeJob> jobs;
      std::vector<size_t> job_prompt;
      for (size_t p = 0; p < prompts.size(); ++p)
        if (length < 0 || cells[cell_of_prompt[p]].length == length) {
          jobs.push_back({prompts[p].ids, o.retrieval_new_tokens, false});
          job_prompt.push_back(p);
        }
      if (length >= 0)
        for (Decoder* d : decoders)
          d->use_key_tables_for(eval::key_table_context_at(o, length + o.retrieval_new_tokens));
      auto run = run_lockstep(decoders, jobs, schedule, {});
      for (size_t j = 0; j < jobs.size(); ++j) generated[job_prompt[j]] = std::move(run[j]);
    }
    std::vector<std::vector<eval::RetrievalCell>> out(cells.size(), std::vector<eval::RetrievalCell>(M));
    for (size_t c = 0; c < cells.size(); ++c)
      for (size_t mi = 0; mi < M; ++mi)
        out[c][mi] = {std::string(formats[mi]->name()), std::string(eval::retrieval_task_name(cells[c].task)),
                      cells[c].length, o.retrieval_depths[cells[c].depth], 0, 0};
    for (size_t p = 0; p < prompts.size(); ++p)
      for (size_t mi = 0; mi < M; ++mi) {
        eval::RetrievalCell& cell = out[cell_of_prompt[p]][mi];
        cell.trials += 1;
        cell.successes +=
            eval::retrieval_success(tokenizer->decode(generated[p][decoder_of_mode[mi]]), prompts[p].answer) ? 1 : 0;
      }
    for (const auto& row : out) report.retrieval.insert(report.retrieval.end(), row.begin(), row.end());
  }
  return report;
}

// ---------------------------------------------------------------------------------------------------------------

std::optional<CacheMode> engine_cache_mode(eval::CacheMode mode) {
  switch (mode) {
    case eval::CacheMode::BF16: return CacheMode::Bf16;
    case eval::CacheMode::Int2: return CacheMode::Int2;
    case eval::CacheMode::Oscar: return CacheMode::Oscar;
    case eval::CacheMode::Hadamard2: return CacheMode::Hadamard2;
    case eval::CacheMode::Int4: return CacheMode::Int4;
    case eval::CacheMode::Fp8: return CacheMode::Fp8;
    case eval::CacheMode::Kivi2: return std::nullopt;
  }
  return std::nullopt;
}

ModeSplit split_engine_modes(std::span<const eval::CacheMode> modes) {
  ModeSplit split;
  for (eval::CacheMode m : modes) (engine_cache_mode(m) ? split.engine : split.cpu_only).push_back(m);
  return split;
}

int64_t max_eval_cache_tokens(const std::vector<eval::ContextSequences>& data, const eval::EvalOptions& o) {
  int64_t longest = 0;
  for (const auto& ctx : data) {
    if (ctx.sequences.empty()) continue;
    longest = std::max(longest, ctx.context - 1);  // teacher-forced: ids[0 .. context-2]
    const int64_t prompt_len = ctx.context - o.greedy_tokens;
    if (o.greedy_prompts > 0 && o.greedy_tokens > 0 && prompt_len > 0)
      longest = std::max(longest, prompt_len + o.greedy_tokens - 1);
  }
  if (o.retrieval)
    for (int64_t length : o.retrieval_lengths)
      longest = std::max(longest, length + std::max<int64_t>(o.retrieval_new_tokens - 1, 0));
  return longest;
}

size_t eval_cache_budget_bytes(const fmt::ModelConfig& cfg, const CacheFormat& format, int64_t batch,
                               int64_t max_tokens) {
  if (batch < 1) throw Error("--gpu-batch", "must be >= 1");
  // The engine's own layout (engine_format.cpp), so per-layer segmented page sizes are budgeted as allocated.
  const KvCacheLayout layout = cache_layout(cfg, format);
  layout.validate("eval cache");
  const auto pages = static_cast<size_t>(std::max<int64_t>(ceil_div(max_tokens, layout.page_tokens), 1));
  const auto B = static_cast<size_t>(batch);
  if (!layout.quantized) return B * pages * layout.bf16_page_bytes();
  // plan_kv_cache gives the windows' bf16 pages of `batch` sequences first, then the rest as INT2 pages.
  return B * (static_cast<size_t>(layout.bf16_pages_per_sequence()) * layout.bf16_page_bytes() +
              pages * layout.int2_page_bytes());
}

void check_schedule(const DecodeScheduleOptions& schedule, const eval::CacheWindows& windows) {
  if (schedule.batch < 1) throw Error("--gpu-batch", "must be >= 1");
  const int64_t most = std::max<int64_t>(windows.sink, 1);
  if (schedule.prefill_tokens < 1 || schedule.prefill_tokens > most)
    throw Error("--prefill-tokens",
                ::fmt::format("{} is outside [1, {}]: a prefill longer than the sink window ({}) would compute "
                              "positions that read quantized tokens outside the decode kernel",
                              schedule.prefill_tokens, most, windows.sink));
}

eval::EvalReport merge_reports(const eval::EvalReport& a, const eval::EvalReport& b,
                               const std::vector<eval::ContextSequences>& data, const eval::EvalOptions& o) {
  eval::EvalReport out = a;
  out.results.clear();
  out.retrieval.clear();
  out.warnings.clear();
  std::vector<std::string> mode_names;
  for (eval::CacheMode m : o.modes) mode_names.emplace_back(eval::cache_mode_name(m));
  auto mode_index = [&](const std::string& name) {
    return static_cast<size_t>(std::find(mode_names.begin(), mode_names.end(), name) - mode_names.begin());
  };

  for (const auto& ctx : data)
    for (const std::string& name : mode_names)
      for (const eval::EvalReport* r : {&a, &b})
        for (const eval::ModeResult& m : r->results)
          if (m.context == ctx.context && m.mode == name) out.results.push_back(m);

  std::vector<eval::RetrievalCell> cells = a.retrieval;
  cells.insert(cells.end(), b.retrieval.begin(), b.retrieval.end());
  auto key = [&](const eval::RetrievalCell& c) {
    const size_t task = c.task == eval::retrieval_task_name(eval::RetrievalTask::Passkey) ? 0 : 1;
    const size_t length = static_cast<size_t>(
        std::find(o.retrieval_lengths.begin(), o.retrieval_lengths.end(), c.length) - o.retrieval_lengths.begin());
    const size_t depth = static_cast<size_t>(
        std::find(o.retrieval_depths.begin(), o.retrieval_depths.end(), c.depth) - o.retrieval_depths.begin());
    return std::make_tuple(task, length, depth, mode_index(c.mode));
  };
  std::stable_sort(cells.begin(), cells.end(), [&](const auto& x, const auto& y) { return key(x) < key(y); });
  out.retrieval = std::move(cells);

  std::set<std::string> seen;
  for (const eval::EvalReport* r : {&a, &b})
    for (const std::string& w : r->warnings)
      if (seen.insert(w).second) out.warnings.push_back(w);
  return out;
}

}  // namespace oscar::rt
