// The per-device bad-target report of the CUDA cross-entropy kernels; bad_target.cuh says the contract.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>
#include <mutex>

#include "cuda/bad_target.cuh"

namespace fused_train {
namespace cuda {
namespace {

// Zero at module load on every device, like any .global variable; one copy per device.
// [0]: the report's claim, [1]: the step guard (bad_target.cuh).
__device__ unsigned int bad_target_words[2];

struct DeviceReport {
  unsigned int* words;       // device address of this device's bad_target_words
  BadTargetSlot* host_slot;  // pinned, mapped
  BadTargetSlot* device_slot;
};

constexpr int kMaxDevices = 64;
std::array<std::atomic<DeviceReport*>, kMaxDevices> reports{};
std::mutex reports_mutex;

// Lets this thread make the one-time setup calls while a CUDA graph is being captured (here or on another
// thread, in torch.cuda.graph's default "global" mode, which forbids them otherwise); torch's caching
// allocator does the same around cudaMalloc. None of the calls below touches a stream, so nothing joins the
// graph.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() { C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&previous_)); }
  ~RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&previous_); }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  cudaStreamCaptureMode previous_ = cudaStreamCaptureModeRelaxed;
};

void check_device(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "fused_train: device index ", device, " is beyond the ",
              kMaxDevices, " CUDA devices fused_train tracks");
}

DeviceReport* existing_report(int device) { return reports[device].load(std::memory_order_acquire); }

DeviceReport* report_of(int device) {
  check_device(device);
  if (DeviceReport* r = existing_report(device)) return r;
  std::lock_guard<std::mutex> lock(reports_mutex);
  if (DeviceReport* r = existing_report(device)) return r;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const RelaxedCaptureMode relaxed;
  auto* r = new DeviceReport{};  // kept for the life of the process, as the pinned slot
  void* words = nullptr;
  C10_CUDA_CHECK(cudaGetSymbolAddress(&words, bad_target_words));
  r->words = static_cast<unsigned int*>(words);
  void* host = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(BadTargetSlot), cudaHostAllocMapped | cudaHostAllocPortable));
  r->host_slot = static_cast<BadTargetSlot*>(host);
  *r->host_slot = BadTargetSlot{0, 0, 0};
  void* mapped = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, host, 0));
  r->device_slot = static_cast<BadTargetSlot*>(mapped);
  reports[device].store(r, std::memory_order_release);
  return r;
}

}  // namespace

BadTargetReport bad_target_report(int device) {
  DeviceReport* r = report_of(device);
  return {r->words, r->words + 1, r->device_slot};
}

unsigned int* bad_target_step_guard(int device) { return report_of(device)->words + 1; }

void raise_if_bad_target_seen(const char* op, int device) {
  check_device(device);
  DeviceReport* r = existing_report(device);
  if (r == nullptr) return;  // no loss kernel has run on this device
  BadTargetSlot* slot = r->host_slot;
  // Acquire: position and value, written before `published` (the kernel fenced them), are read after it.
  if (__atomic_load_n(&slot->published, __ATOMIC_ACQUIRE) == 0) return;
  int64_t position = 0, value = 0;
  {
    std::lock_guard<std::mutex> lock(reports_mutex);
    if (__atomic_load_n(&slot->published, __ATOMIC_ACQUIRE) == 0) return;  // another thread took the report
    position = __atomic_load_n(&slot->position, __ATOMIC_RELAXED);
    value = __atomic_load_n(&slot->value, __ATOMIC_RELAXED);
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    // While capturing, a memset would only be recorded; leave the report for the next uncaptured call.
    if (status == cudaStreamCaptureStatusNone) {
      // Unpublished before the claim is cleared: no kernel can publish again until then. The step guard is
      // left to the device (bad_target.cuh): NaN gradients may still sit in .grad.
      __atomic_store_n(&slot->published, 0, __ATOMIC_RELEASE);
      const cudaError_t err = cudaMemsetAsync(r->words, 0, sizeof(unsigned int), stream);
      if (err != cudaSuccess) __atomic_store_n(&slot->published, 1, __ATOMIC_RELEASE);  // keep the report
      C10_CUDA_CHECK(err);
    }
  }
  TORCH_CHECK_INDEX(false, op, ": an earlier cross-entropy kernel on cuda:", device, " got target ", value,
                    " at position ", position,
                    ", out of bounds (expected 0 <= target < classes or target == ignore_index); that row's loss "
                    "and gradient were written as NaN, and the next fused_train optimizer step on this device is "
                    "skipped");
}

}  // namespace cuda
}  // namespace fused_train
