// config.json -> ModelConfig: JSON syntax, field types, architectures, rope layouts, dimension checks.
#include "formats/error.h"
#include "formats/model_config.h"
#include "fuzz/fuzz_input_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = oscar::fuzz::write_input("config.json", data, size);
  try {
    const auto cfg = oscar::fmt::ModelConfig::from_file(path);
    // Derived quantities every consumer computes must be defined for anything the parser accepts.
    (void)cfg.group_size();
    (void)cfg.q_dim();
    (void)cfg.kv_dim();
  } catch (const oscar::Error&) {
  }
  return 0;
}
