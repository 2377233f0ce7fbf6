#include "kernels/embedding/embedding.h"

#include <algorithm>

#include "formats/dtype.h"

namespace oscar::kern {

void embedding_gather_ref(std::span<const int32_t> ids, const uint16_t* table, int64_t vocab, int64_t hidden,
                          float* out) {
  for (size_t t = 0; t < ids.size(); ++t) {
    float* row = out + static_cast<int64_t>(t) * hidden;
    const int32_t id = ids[t];
    if (id < 0 || id >= vocab) {
      std::fill(row, row + hidden, 0.f);
      continue;
    }
    const uint16_t* src = table + static_cast<int64_t>(id) * hidden;
    for (int64_t i = 0; i < hidden; ++i) row[i] = fmt::bf16_to_f32(src[i]);
  }
}

}  // namespace oscar::kern
