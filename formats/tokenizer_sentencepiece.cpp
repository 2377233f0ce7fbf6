// SentencePiece tokenizer.model through libsentencepiece. Encoding follows transformers' LlamaTokenizer
// conventions so that ids agree with the equivalent tokenizer.json: add_special_tokens prepends BOS (taken from
// tokenizer_config.json when present, else from the model), and control pieces written in the text ("<s>",
// "</s>") are matched as single tokens, the text between them being encoded separately (each chunk gets
// SentencePiece's dummy-prefix "▁", just as the Prepend("▁") normalizer of tokenizer.json applies per chunk).
#include <sentencepiece_processor.h>

#include <algorithm>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "formats/error.h"
#include "formats/tokenizer.h"

namespace oscar::fmt {
namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::filesystem::path& file) {
    const std::string where = file.string();
    if (!std::filesystem::exists(file)) throw Error(where, "file does not exist");
    const auto status = processor_.Load(where);
    if (!status.ok()) throw Error(where, "cannot load SentencePiece model: " + status.ToString());
    for (int id = 0; id < processor_.GetPieceSize(); ++id)
      if (processor_.IsControl(id)) control_pieces_.emplace_back(processor_.IdToPiece(id), id);
    // Longest first, so that a control piece that is a prefix of another never wins.
    std::sort(control_pieces_.begin(), control_pieces_.end(),
              [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    resolve_bos_eos(file);
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<int32_t> ids;
    if (add_special_tokens && bos_id_) ids.push_back(*bos_id_);
    size_t chunk_start = 0, pos = 0;
    while (pos < text.size()) {
      const auto hit = std::find_if(control_pieces_.begin(), control_pieces_.end(), [&](const auto& c) {
        return !c.first.empty() && text.compare(pos, c.first.size(), c.first) == 0;
      });
      if (hit == control_pieces_.end()) {
        ++pos;
        continue;
      }
      encode_chunk(text.substr(chunk_start, pos - chunk_start), ids);
      ids.push_back(hit->second);
      pos += hit->first.size();
      chunk_start = pos;
    }
    encode_chunk(text.substr(chunk_start), ids);
    return ids;
  }

  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const override {
    // SentencePiece decodes control ids to nothing; when they are to be kept, the runs between them are decoded
    // separately and the control pieces written verbatim.
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      std::string text;
      const auto status = processor_.Decode(run, &text);
      if (!status.ok()) throw Error("sentencepiece.decode", status.ToString());
      out += text;
      run.clear();
    };
    for (int32_t id : ids) {
      if (id < 0 || id >= processor_.GetPieceSize()) continue;
      if (processor_.IsControl(id)) {
        if (!skip_special_tokens) {
          flush();
          out += processor_.IdToPiece(id);
        }
        continue;
      }
      run.push_back(id);
    }
    flush();
    return out;
  }

  int64_t vocab_size() const override { return processor_.GetPieceSize(); }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    const int id = processor_.PieceToId(std::string(token));
    // PieceToId answers the unk id for unknown pieces; only the piece spelled exactly so really maps there.
    if (id < 0 || processor_.IdToPiece(id) != token) return std::nullopt;
    return id;
  }
  std::string id_to_token(int32_t id) const override {
    if (id < 0 || id >= processor_.GetPieceSize())
      throw Error("sentencepiece", "id " + std::to_string(id) + " is not in the vocabulary");
    return processor_.IdToPiece(id);
  }
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::optional<int32_t> eos_id() const override { return eos_id_; }
  std::string kind() const override { return "sentencepiece"; }

 private:
  void encode_chunk(std::string_view chunk, std::vector<int32_t>& ids) const {
    if (chunk.empty()) return;
    std::vector<int> piece_ids;
    const auto status = processor_.Encode(std::string(chunk), &piece_ids);
    if (!status.ok()) throw Error("sentencepiece.encode", status.ToString());
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
  }

  // transformers' LlamaTokenizer takes BOS/EOS from tokenizer_config.json, not from the model's trainer_spec,
  // and converted models do carry inconsistent trainer_specs (the llama2.c fixtures' names "</s>" as bos_piece).
  // So the config beside the model wins; the trainer_spec is the fallback.
  void resolve_bos_eos(const std::filesystem::path& file) {
    const auto config_path = file.parent_path() / "tokenizer_config.json";
    if (std::filesystem::exists(config_path)) {
      nlohmann::json config;
      try {
        std::ifstream in(config_path, std::ios::binary);
        config = nlohmann::json::parse(in);
      } catch (const nlohmann::json::exception& e) {
        throw Error(config_path.string(), std::string("malformed JSON: ") + e.what());
      }
      auto lookup = [&](const char* key) -> std::optional<int32_t> {
        if (!config.is_object() || !config.contains(key)) return std::nullopt;
        const auto& v = config[key];
        if (v.is_string()) return token_to_id(v.get<std::string>());
        if (v.is_object() && v.contains("content") && v["content"].is_string())
          return token_to_id(v["content"].get<std::string>());
        return std::nullopt;
      };
      if (config.is_object() && (config.contains("bos_token") || config.contains("eos_token"))) {
        bos_id_ = lookup("bos_token");
        eos_id_ = lookup("eos_token");
        return;
      }
    }
    if (processor_.bos_id() >= 0) bos_id_ = processor_.bos_id();
    if (processor_.eos_id() >= 0) eos_id_ = processor_.eos_id();
  }

  sentencepiece::SentencePieceProcessor processor_;
  std::vector<std::pair<std::string, int32_t>> control_pieces_;
  std::optional<int32_t> bos_id_, eos_id_;
};

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::from_sentencepiece(const std::filesystem::path& file) {
  return std::make_unique<SentencePieceTokenizer>(file);
}

}  // namespace oscar::fmt
