// oscar tokenize: text -> token ids with the model's own tokenizer, printed as a JSON array.
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/error.h"

namespace oscar::app {
namespace {

struct TokenizeOptions {
  std::string model_dir;
  std::string text;
  std::string file;
  std::string device = "cpu";
  bool no_special = false;
  bool json = false;
};

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path, "cannot open (--file)");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int run_tokenize(const TokenizeOptions& o) {
  require_cpu_device(o.device);
  auto tok = load_tokenizer(o.model_dir);
  const std::string text = o.file.empty() ? o.text : read_text_file(o.file);
  const std::vector<int32_t> ids = tok->encode(text, /*add_special_tokens=*/!o.no_special);
  nlohmann::json out;
  if (o.json) {
    std::vector<std::string> pieces;
    for (int32_t id : ids) pieces.push_back(tok->id_to_token(id));
    // Pieces of byte-level vocabularies are not always valid UTF-8 on their own; replace rather than fail.
    out = {{"ids", ids}, {"tokens", pieces}, {"count", ids.size()}, {"tokenizer", tok->kind()}};
    std::puts(out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    out = ids;
    std::puts(out.dump().c_str());
  }
  return 0;
}

}  // namespace

OSCAR_REGISTER_COMMAND("tokenize", "Print the token ids of a text (JSON array)", 20, [](CLI::App& sub) -> RunCommand {
  auto o = std::make_shared<TokenizeOptions>();
  add_model_option(sub, o->model_dir);
  auto* text = sub.add_option("--text", o->text, "text to tokenize");
  auto* file = sub.add_option("--file", o->file, "file whose bytes are tokenized as one text")->type_name("FILE");
  text->excludes(file);
  file->excludes(text);
  sub.add_flag("--no-special", o->no_special, "do not add special tokens (BOS) from the post-processor");
  add_device_option(sub, o->device);
  add_json_flag(sub, o->json)->description("print {ids, tokens, count, tokenizer} instead of the bare id array");
  sub.callback([text, file] {
    if (text->count() == 0 && file->count() == 0) throw CLI::RequiredError("--text or --file");
  });
  return [o] { return run_tokenize(*o); };
});

}  // namespace oscar::app
