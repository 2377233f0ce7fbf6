#include "kernels/embedding/embedding.cuh"
#include "kernels/embedding/embedding.h"

namespace oscar::kern {

Status embedding_gather(const int32_t* ids, int64_t num_tokens, const uint16_t* table, int64_t vocab,
                        int64_t hidden, float* out, Stream stream) {
  if (num_tokens < 0 || vocab <= 0 || hidden <= 0) return Status::InvalidArgument;
  if (num_tokens == 0) return Status::Ok;
  if (!ids || !table || !out) return Status::InvalidArgument;
  if (num_tokens > 0x7fffffff) return Status::Unsupported;  // grid.x limit is far above, but ids are int32-indexed
  const int threads = hidden >= 256 ? 256 : 64;
  detail::embedding_gather_kernel<<<static_cast<unsigned>(num_tokens), threads, 0, detail::to_cuda(stream)>>>(
      ids, table, vocab, hidden, out);
  return detail::launch_status();
}

}  // namespace oscar::kern
