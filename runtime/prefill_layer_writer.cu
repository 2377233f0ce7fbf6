// rt::PrefillLayerWriter (runtime/prefill_layer_writer.h).
#include <cuda_runtime.h>

#include <algorithm>

#include "formats/error.h"
#include "kernels/common/device_utils.cuh"
#include "runtime/prefill_layer_writer.h"

namespace oscar::rt {

namespace {

// bf16 head vectors [rows, src_dim] -> [rows, dst_dim], bits copied: dims past src_dim become 0 (small head dims
// padded to the cache's), dims past dst_dim are dropped.
__global__ void copy_heads_kernel(const uint16_t* __restrict__ src, int64_t rows, int src_dim,
                                  uint16_t* __restrict__ dst, int dst_dim) {
  const int64_t n = rows * dst_dim;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dst_dim;
    const int j = static_cast<int>(i - r * dst_dim);
    dst[i] = j < src_dim ? src[r * src_dim + j] : uint16_t{0};
  }
}

cudaEvent_t as_event(void* e) { return static_cast<cudaEvent_t>(e); }
cudaStream_t as_stream(Stream s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

void copy_heads(const uint16_t* src, int64_t rows, int64_t src_dim, uint16_t* dst, int64_t dst_dim, Stream stream,
                const std::string& where) {
  const int64_t n = rows * dst_dim;
  if (n == 0) return;
  if (src_dim == dst_dim) {
    check_cuda(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * 2, cudaMemcpyDeviceToDevice, as_stream(stream)),
               where);
    return;
  }
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
  copy_heads_kernel<<<blocks, 256, 0, as_stream(stream)>>>(src, rows, static_cast<int>(src_dim), dst,
                                                           static_cast<int>(dst_dim));
  check_cuda(cudaGetLastError(), where);
}

PrefillLayerWriter::PrefillLayerWriter(bool overlap) : overlap_(overlap) {
  if (!overlap_) return;
  // The lowest priority: the side stream's blocks take SMs the forward leaves free (between GEMM waves, the tails
  // of attention) rather than delaying the forward's own kernels, which the next layer waits on.
  int least = 0, greatest = 0;
  check_cuda(cudaDeviceGetStreamPriorityRange(&least, &greatest), "PrefillLayerWriter: stream priorities");
  cudaStream_t side = nullptr;
  check_cuda(cudaStreamCreateWithPriority(&side, cudaStreamNonBlocking, least), "PrefillLayerWriter: side stream");
  side_ = reinterpret_cast<Stream>(side);
  for (int i = 0; i < 2; ++i) {
    cudaEvent_t e = nullptr;
    check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "PrefillLayerWriter: event");
    ready_[i] = e;
    check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "PrefillLayerWriter: event");
    done_[i] = e;
  }
}

PrefillLayerWriter::~PrefillLayerWriter() {
  if (!side_) return;
  drain();  // no throw from a destructor; a failure here has been reported already
  for (int i = 0; i < 2; ++i) {
    if (ready_[i]) cudaEventDestroy(as_event(ready_[i]));
    if (done_[i]) cudaEventDestroy(as_event(done_[i]));
  }
  cudaStreamDestroy(as_stream(side_));
}

void PrefillLayerWriter::write_layer(const DeviceAttentionInputs& in, int64_t dst_dim, const WriteFn& write,
                                     const std::string& where) {
  const int64_t rows = in.num_tokens * in.num_kv_heads;
  const size_t bytes = static_cast<size_t>(rows * dst_dim) * 2;
  const int pair = overlap_ ? static_cast<int>(next_pair_++ % 2) : 0;
  const cudaStream_t forward = as_stream(in.stream);
  if (overlap_ && used_[pair]) {
    // The write that last read this pair must be done before the copy overwrites it. ensure() may reallocate,
    // which frees the old buffer while that write could still read it: wait on the host then (a larger prompt than
    // any before: once per size, not per layer).
    if (stage_k_[pair].bytes() < bytes) check_cuda(cudaEventSynchronize(as_event(done_[pair])), where + " staging");
    else check_cuda(cudaStreamWaitEvent(forward, as_event(done_[pair]), 0), where + " staging");
  }
  if (!in.k_bf16 || !in.v_bf16) throw Error(where, "the forward passed no bf16 K/V to stage");
  // On the forward's stream with the cache's head dim, the forward's bf16 K/V are what the write reads: they stay
  // put until the next layer's QKV prep, which this stream runs after the write.
  if (!overlap_ && dst_dim == in.head_dim) {
    write(in.layer, in.k_bf16, in.v_bf16, in.stream);
    return;
  }
  stage_k_[pair].ensure(bytes, "prefill K staging");
  stage_v_[pair].ensure(bytes, "prefill V staging");
  uint16_t* k = stage_k_[pair].as<uint16_t>();
  uint16_t* v = stage_v_[pair].as<uint16_t>();
  copy_heads(in.k_bf16, rows, in.head_dim, k, dst_dim, in.stream, where + " K staging");
  copy_heads(in.v_bf16, rows, in.head_dim, v, dst_dim, in.stream, where + " V staging");
  if (!overlap_) {
    write(in.layer, k, v, in.stream);
    return;
  }
  check_cuda(cudaEventRecord(as_event(ready_[pair]), forward), where + " staging event");
  check_cuda(cudaStreamWaitEvent(as_stream(side_), as_event(ready_[pair]), 0), where + " side stream wait");
  write(in.layer, k, v, side_);
  check_cuda(cudaEventRecord(as_event(done_[pair]), as_stream(side_)), where + " write event");
  used_[pair] = true;
  last_ = pair;
}

void PrefillLayerWriter::join(Stream stream, const std::string& where) {
  if (!overlap_ || last_ < 0) return;
  check_cuda(cudaStreamWaitEvent(as_stream(stream), as_event(done_[last_]), 0), where + ": join the cache writes");
}

void PrefillLayerWriter::drain() noexcept {
  if (side_) cudaStreamSynchronize(as_stream(side_));  // an error here is the one the caller is already handling
}

}  // namespace oscar::rt
