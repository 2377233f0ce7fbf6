#pragma once
// Text -> fixed-length token sequences for calibration and evaluation.
//
// Packing policy:
//   1. Files are read in expand_sources order; each text/JSONL document is tokenized on its own with
//      add_special_tokens=false, and the document separator is put IN FRONT of it. The separator is, unless set
//      explicitly, the tokenizer's BOS, else its EOS, else nothing: Llama-style models see "<s> doc <s> doc ...",
//      and models whose BOS = EOS = <|endoftext|> (Qwen, GPT-2) see the separator they were trained with between
//      documents. A document that tokenizes to nothing is dropped and counted.
//   2. Token files are appended verbatim (no separator): they carry their own.
//   3. The concatenated stream is cut into consecutive sequences of seq_len tokens; sequences may span documents.
//      The tail shorter than seq_len is dropped (counted in PackStats::dropped_tail_tokens).
//   4. If shuffle is on, the sequences are permuted with shuffled_indices(count, seed) (datasets/shuffle.h).
//   5. The first num_seqs sequences are kept (0 = all). Without shuffling, reading stops as soon as num_seqs
//      sequences are complete, so asking for a few sequences of a large corpus is cheap.
// Nothing is skipped silently: invalid UTF-8 lines, bad JSONL lines and empty documents are counted in PackStats.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "datasets/sources.h"
#include "formats/tokenizer.h"

namespace oscar::data {

struct PackOptions {
  int64_t seq_len = 2048;
  int64_t num_seqs = 0;  // 0: every complete sequence
  bool shuffle = true;
  uint64_t seed = 0;
  // Token put in front of each text document; nullopt: BOS, else EOS, else none (see above).
  std::optional<int32_t> doc_separator;
  bool use_separator = true;  // false: documents are concatenated with nothing between them
};

// Provenance of one file that was read.
struct SourceFileInfo {
  std::string path;
  SourceFormat format = SourceFormat::Text;
  uint64_t bytes = 0;
  std::string sha256;  // lowercase hex of the file's bytes
  int64_t documents = 0;
  int64_t tokens = 0;  // tokens this file contributed to the stream (separators included)
};

struct PackStats {
  int64_t files = 0;
  int64_t documents = 0;
  int64_t empty_documents = 0;      // tokenized to nothing: dropped
  int64_t invalid_utf8_lines = 0;   // skipped text lines
  int64_t bad_jsonl_lines = 0;      // skipped JSONL lines
  int64_t stream_tokens = 0;        // tokens in the concatenated stream (what was read)
  int64_t sequences_available = 0;  // complete sequences in the stream
  int64_t dropped_tail_tokens = 0;  // stream_tokens - sequences_available * seq_len
  bool stopped_early = false;       // reading stopped once num_seqs sequences were complete (no shuffle)
  std::optional<int32_t> separator;  // the separator actually used
  std::vector<std::string> warnings;  // "file:line: reason", at most kMaxWarnings
};

struct PackedDataset {
  int64_t seq_len = 0;
  std::vector<int32_t> tokens;  // [num_seqs, seq_len] row-major
  std::vector<SourceFileInfo> files;
  PackStats stats;

  int64_t num_seqs() const { return seq_len > 0 ? static_cast<int64_t>(tokens.size()) / seq_len : 0; }
  std::span<const int32_t> sequence(int64_t i) const {
    return std::span<const int32_t>(tokens).subspan(static_cast<size_t>(i * seq_len), static_cast<size_t>(seq_len));
  }
};

// Reads, tokenizes and packs `specs`. `tokenizer` may be null only when every file is a token file; ids in token
// files must then be below its vocab_size when a tokenizer is given. Throws oscar::Error: seq_len < 1 or
// num_seqs < 0 ("--seq-len"/"--num-seqs"), missing files (named), a text source without a tokenizer, and data
// that yields no complete sequence ("not enough tokens", with the counts).
PackedDataset pack_dataset(const std::vector<std::string>& specs, const fmt::Tokenizer* tokenizer,
                           const SourceOptions& source_opt, const PackOptions& pack_opt);

}  // namespace oscar::data
