#include "datasets/pack.h"

#include <algorithm>

#include "datasets/shuffle.h"
#include "datasets/token_file.h"
#include "formats/atomic_file.h"
#include "formats/error.h"

namespace oscar::data {
namespace fs = std::filesystem;

namespace {

std::optional<int32_t> choose_separator(const fmt::Tokenizer* tok, const PackOptions& opt) {
  if (!opt.use_separator) return std::nullopt;
  if (opt.doc_separator) return opt.doc_separator;
  if (!tok) return std::nullopt;
  if (auto bos = tok->bos_id()) return bos;
  return tok->eos_id();
}

}  // namespace

PackedDataset pack_dataset(const std::vector<std::string>& specs, const fmt::Tokenizer* tokenizer,
                           const SourceOptions& source_opt, const PackOptions& opt) {
  if (opt.seq_len < 1) throw Error("--seq-len", "must be at least 1, got " + std::to_string(opt.seq_len));
  if (opt.num_seqs < 0) throw Error("--num-seqs", "must be >= 0, got " + std::to_string(opt.num_seqs));
  const std::vector<fs::path> files = expand_sources(specs);
  if (!tokenizer) {
    for (const auto& f : files)
      if (resolve_format(f, source_opt) != SourceFormat::Tokens)
        throw Error(f.string(), "text data needs a tokenizer (none was given)");
  }

  PackedDataset out;
  out.seq_len = opt.seq_len;
  PackStats& st = out.stats;
  st.separator = choose_separator(tokenizer, opt);
  if (st.separator && tokenizer && (*st.separator < 0 || *st.separator >= tokenizer->vocab_size()))
    throw Error("--doc-separator", "id " + std::to_string(*st.separator) + " is outside the vocabulary");

  // Early stop only without shuffling: a shuffle must see every sequence for the permutation to be defined.
  const int64_t wanted_tokens = (!opt.shuffle && opt.num_seqs > 0) ? opt.num_seqs * opt.seq_len : -1;
  std::vector<int32_t>& stream = out.tokens;
  auto have_enough = [&] { return wanted_tokens >= 0 && static_cast<int64_t>(stream.size()) >= wanted_tokens; };

  ReadCounters counters;
  for (const auto& file : files) {
    if (have_enough()) {
      st.stopped_early = true;
      break;
    }
    SourceFileInfo info;
    info.path = file.string();
    info.format = resolve_format(file, source_opt);
    info.bytes = fs::file_size(file);
    info.sha256 = fmt::sha256_file(file);
    const size_t before = stream.size();
    if (info.format == SourceFormat::Tokens) {
      std::vector<int32_t> ids = read_token_file(file);
      if (tokenizer) {
        for (size_t i = 0; i < ids.size(); ++i)
          if (ids[i] >= tokenizer->vocab_size())
            throw Error(info.path, "token " + std::to_string(i) + " has id " + std::to_string(ids[i]) +
                                       ", outside the tokenizer's vocabulary of " +
                                       std::to_string(tokenizer->vocab_size()));
      }
      stream.insert(stream.end(), ids.begin(), ids.end());
      info.documents = 1;
      ++st.documents;
    } else {
      const int64_t docs_before = counters.documents;
      read_documents(file, info.format, source_opt, counters, [&](std::string_view doc) {
        std::vector<int32_t> ids = tokenizer->encode(doc, /*add_special_tokens=*/false);
        if (ids.empty()) {
          ++st.empty_documents;
          return true;
        }
        if (st.separator) stream.push_back(*st.separator);
        stream.insert(stream.end(), ids.begin(), ids.end());
        return !have_enough();
      });
      info.documents = counters.documents - docs_before;
      st.documents += info.documents;
    }
    info.tokens = static_cast<int64_t>(stream.size() - before);
    out.files.push_back(std::move(info));
  }
  st.files = static_cast<int64_t>(out.files.size());
  st.invalid_utf8_lines = counters.invalid_utf8_lines;
  st.bad_jsonl_lines = counters.bad_jsonl_lines;
  st.warnings = std::move(counters.warnings);
  st.stream_tokens = static_cast<int64_t>(stream.size());
  st.sequences_available = st.stream_tokens / opt.seq_len;
  st.dropped_tail_tokens = st.stream_tokens - st.sequences_available * opt.seq_len;
  if (st.sequences_available == 0) {
    std::string where = specs.size() == 1 ? specs.front() : "--data";
    throw Error(where, "not enough tokens: the data holds " + std::to_string(st.stream_tokens) +
                           " tokens, fewer than one sequence of " + std::to_string(opt.seq_len) + " (" +
                           std::to_string(st.documents) + " documents, " + std::to_string(st.invalid_utf8_lines) +
                           " invalid UTF-8 lines, " + std::to_string(st.bad_jsonl_lines) + " bad JSONL lines skipped)");
  }
  stream.resize(static_cast<size_t>(st.sequences_available * opt.seq_len));

  const int64_t keep = opt.num_seqs > 0 ? std::min(opt.num_seqs, st.sequences_available) : st.sequences_available;
  if (opt.shuffle) {
    const std::vector<int64_t> order = shuffled_indices(st.sequences_available, opt.seed);
    std::vector<int32_t> shuffled(static_cast<size_t>(keep * opt.seq_len));
    for (int64_t i = 0; i < keep; ++i)
      std::copy_n(stream.begin() + order[i] * opt.seq_len, opt.seq_len, shuffled.begin() + i * opt.seq_len);
    stream = std::move(shuffled);
  } else {
    stream.resize(static_cast<size_t>(keep * opt.seq_len));
  }
  stream.shrink_to_fit();
  return out;
}

}  // namespace oscar::data
