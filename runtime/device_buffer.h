#pragma once
// Owning device allocations for the GPU runtime. CUDA-free header: host code that only passes buffers around
// (calibration observers, eval) does not need the CUDA headers.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace oscar::rt {

// Throws oscar::Error(where, cuda error string) when `status` (a cudaError_t) is not cudaSuccess.
void check_cuda(int status, const std::string& where);

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // Allocates `bytes` (uninitialized); throws oscar::Error naming `what` when the device is out of memory.
  explicit DeviceBuffer(size_t bytes, const std::string& what = "device buffer");
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  bool empty() const { return bytes_ == 0; }
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }

  // Grow-only scratch: reallocates (dropping the contents) only when `bytes` exceeds the current size, so
  // repeated forwards of similar sizes allocate nothing.
  void ensure(size_t bytes, const std::string& what = "device buffer");

  // Synchronous copies of a host range into / out of the start of the buffer.
  void upload(const void* host, size_t bytes, size_t offset = 0);
  void download(void* host, size_t bytes, size_t offset = 0) const;

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

template <class T>
DeviceBuffer to_device(std::span<const T> host, const std::string& what = "device buffer") {
  DeviceBuffer b(host.size_bytes(), what);
  if (!host.empty()) b.upload(host.data(), host.size_bytes());
  return b;
}

template <class T>
std::vector<T> to_host(const T* device, size_t count);  // defined for float, uint16_t, int32_t

}  // namespace oscar::rt
