#include <cuda_runtime.h>

#include <utility>

#include "formats/error.h"
#include "runtime/device_buffer.h"

namespace oscar::rt {

void check_cuda(int status, const std::string& where) {
  const auto err = static_cast<cudaError_t>(status);
  if (err != cudaSuccess) throw Error(where, std::string("CUDA: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

DeviceBuffer::DeviceBuffer(size_t bytes, const std::string& what) { ensure(bytes, what); }

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::ensure(size_t bytes, const std::string& what) {
  if (bytes <= bytes_) return;
  if (ptr_) cudaFree(ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
  check_cuda(cudaMalloc(&ptr_, bytes), what + " (" + std::to_string(bytes) + " bytes)");
  bytes_ = bytes;
}

void DeviceBuffer::upload(const void* host, size_t bytes, size_t offset) {
  if (offset + bytes > bytes_) throw Error("DeviceBuffer::upload", "copy past the end of the buffer");
  check_cuda(cudaMemcpy(static_cast<char*>(ptr_) + offset, host, bytes, cudaMemcpyHostToDevice), "DeviceBuffer::upload");
}

void DeviceBuffer::download(void* host, size_t bytes, size_t offset) const {
  if (offset + bytes > bytes_) throw Error("DeviceBuffer::download", "copy past the end of the buffer");
  check_cuda(cudaMemcpy(host, static_cast<const char*>(ptr_) + offset, bytes, cudaMemcpyDeviceToHost),
             "DeviceBuffer::download");
}

template <class T>
std::vector<T> to_host(const T* device, size_t count) {
  std::vector<T> out(count);
  if (count) check_cuda(cudaMemcpy(out.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost), "to_host");
  return out;
}
template std::vector<float> to_host(const float*, size_t);
template std::vector<uint16_t> to_host(const uint16_t*, size_t);
template std::vector<int32_t> to_host(const int32_t*, size_t);

}  // namespace oscar::rt
