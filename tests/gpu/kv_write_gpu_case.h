#pragma once
// The INT2 quantize-on-write GPU tests' shared setup (test_kv_write_gpu.cpp, test_kv_write_ef_gpu.cpp): a case of
// `tokens` x `heads` head vectors in strided bf16 rows with shuffled page slots, and one run of a GPU writer beside
// kv_write_ref on the same pool, for a byte comparison.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "../kernels/kv_write_ef_util.h"
#include "formats/dtype.h"
#include "formats/kv_layout.h"
#include "kernels/kv_quantize/kv_quantize.h"
#include "kernels/kv_quantize/kv_quantize_ref.h"
#include "gpu_test_buffer.h"

namespace oscar::test {

struct KvWriteCase {
  int d = 128, heads = 3, tokens = 0;
  int64_t stride = 0;  // elements between tokens (>= heads * d)
  std::vector<uint16_t> x;
  std::vector<int32_t> slots;
  int pages = 0;
};

// x rows strided by `pad` extra elements (x a slice of a wider tensor; the padding holds 123 and must not be read),
// head vector (t, h) filled by fill(t, h, rng, dst); then the slots: shuffled over (tokens + 63) / 64 + 1 pages of 64,
// every 7th skipped and one whole 16-token tile (tokens 32..47) skipped.
inline KvWriteCase kv_write_case(int d, int heads, int tokens, int pad, uint32_t seed,
                                 const std::function<void(int t, int h, std::mt19937& rng, uint16_t* dst)>& fill) {
  KvWriteCase c;
  c.d = d;
  c.heads = heads;
  c.tokens = tokens;
  c.stride = static_cast<int64_t>(heads) * d + pad;
  c.pages = (tokens + 63) / 64 + 1;
  c.x.assign(static_cast<size_t>(tokens) * c.stride, fmt::f32_to_bf16(123.f));
  std::mt19937 rng(seed);
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < heads; ++h) fill(t, h, rng, c.x.data() + static_cast<size_t>(t) * c.stride + static_cast<size_t>(h) * d);
  std::vector<int32_t> all(static_cast<size_t>(c.pages) * 64);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  c.slots.assign(all.begin(), all.begin() + tokens);
  for (int t = 0; t < tokens; t += 7) c.slots[static_cast<size_t>(t)] = -1;
  for (int t = 32; t < std::min(tokens, 48); ++t) c.slots[static_cast<size_t>(t)] = -1;
  return c;
}

struct KvWritePools {
  std::vector<uint8_t> gpu, ref;
};

// One GPU write (launch(params) with device pointers) and kv_write_ref's (host pointers), both into a pool
// pre-filled with 0xab so stray writes show. rot: row-major [d, d] or null; tables: EF tables or null (RTN).
inline KvWritePools run_kv_write(const KvWriteCase& c, const std::vector<float>* rot, float ratio,
                                 const EfTables* tables, bool clip_feedback,
                                 const std::function<kern::Status(const kern::KvWriteParams&)>& launch) {
  const fmt::Int2PageGeometry geo{c.d, 64};
  std::vector<uint8_t> pool(static_cast<size_t>(c.pages) * c.heads * geo.page_bytes(), 0xab);
  kern::KvWriteParams p;
  p.tokens = c.tokens;
  p.token_stride = c.stride;
  p.num_kv_heads = c.heads;
  p.head_dim = c.d;
  p.page_tokens = 64;
  p.clip_ratio = ratio;
  p.ef_clip_feedback = clip_feedback;
  gpu::DeviceBuffer<uint16_t> dx(c.x);
  gpu::DeviceBuffer<float> drot(rot ? *rot : std::vector<float>{});
  gpu::DeviceBuffer<int32_t> dslots(c.slots);
  gpu::DeviceBuffer<uint8_t> dpool(pool);
  gpu::DeviceBuffer<int32_t> dorder(tables ? tables->order : std::vector<int32_t>{});
  gpu::DeviceBuffer<float> dweights(tables ? tables->weights : std::vector<float>{});
  p.x = dx.ptr;
  p.rotation = rot ? drot.ptr : nullptr;
  p.slots = dslots.ptr;
  p.int2_pool = dpool.ptr;
  p.ef_order = tables ? dorder.ptr : nullptr;
  p.ef_weights = tables ? dweights.ptr : nullptr;
  EXPECT_EQ(launch(p), kern::Status::Ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  KvWritePools out{dpool.download(), pool};
  p.x = c.x.data();
  p.rotation = rot ? rot->data() : nullptr;
  p.slots = c.slots.data();
  p.int2_pool = out.ref.data();
  p.ef_order = tables ? tables->order.data() : nullptr;
  p.ef_weights = tables ? tables->weights.data() : nullptr;
  kern::kv_write_ref(p, kern::KvWriteMode::Int2);
  return out;
}

}  // namespace oscar::test
