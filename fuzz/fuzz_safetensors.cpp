// safetensors reader: header length, JSON header, dtypes, shapes, offsets; then every conversion the loaders use
// on whatever tensors survived validation.
#include <algorithm>

#include "formats/error.h"
#include "formats/safetensors.h"
#include "fuzz/fuzz_input_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = oscar::fuzz::write_input("model.safetensors", data, size);
  try {
    auto file = oscar::fmt::SafetensorsFile::open(path);
    for (const auto& t : file->tensors()) {
      if (!oscar::fmt::is_float(t.dtype) || t.dtype == oscar::fmt::DType::F8_E4M3 ||
          t.dtype == oscar::fmt::DType::F8_E5M2 || t.numel() > (1 << 16))
        continue;
      try {
        const auto values = oscar::fmt::to_f32(t);
        (void)oscar::fmt::to_bf16(t);
        std::vector<float> row(static_cast<size_t>(std::min<int64_t>(t.numel(), 3)));
        oscar::fmt::to_f32_range(t, t.numel() - static_cast<int64_t>(row.size()), row);
        (void)values;
      } catch (const oscar::Error&) {
      }
    }
  } catch (const oscar::Error&) {
  }
  return 0;
}
