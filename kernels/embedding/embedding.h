#pragma once
// Token embedding: out[t, :] = float(table[ids[t], :]). The table is the model's bf16 embedding matrix; the output
// is the fp32 residual stream the rest of the forward accumulates into.
#include <cstdint>
#include <span>

#include "kernels/common/status.h"

namespace oscar::kern {

// ids [num_tokens] (device), table [vocab, hidden] bf16 bits (device), out [num_tokens, hidden] fp32 (device).
// Ids are validated on the host before upload (the launcher cannot read device memory); an id outside
// [0, vocab) still never reads out of bounds: its row is written as zeros.
Status embedding_gather(const int32_t* ids, int64_t num_tokens, const uint16_t* table, int64_t vocab,
                        int64_t hidden, float* out, Stream stream);

// CPU reference (host pointers), same contract.
void embedding_gather_ref(std::span<const int32_t> ids, const uint16_t* table, int64_t vocab, int64_t hidden,
                          float* out);

}  // namespace oscar::kern
