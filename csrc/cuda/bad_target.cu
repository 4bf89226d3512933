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
__device__ unsigned int bad_target_claim_flag;

struct DeviceReport {
  unsigned int* claim;       // device address of this device's bad_target_claim_flag
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
  void* claim = nullptr;
  C10_CUDA_CHECK(cudaGetSymbolAddress(&claim, bad_target_claim_flag));
  r->claim = static_cast<unsigned int*>(claim);
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
  return {r->claim, r->device_slot};
}

const unsigned int* bad_target_claim(int device) { return report_of(device)->claim; }

void raise_if_bad_target_seen(const char* op, int device) {
  check_device(device);
  DeviceReport* r = existing_report(device);
  if (r == nullptr) return;  // no loss kernel has run on this device
  volatile BadTargetSlot* slot = r->host_slot;
  if (slot->published == 0) return;
  int64_t position = 0, value = 0;
  {
    std::lock_guard<std::mutex> lock(reports_mutex);
    if (slot->published == 0) return;  // another thread took the report
    std::atomic_thread_fence(std::memory_order_acquire);
    position = slot->position;
    value = slot->value;
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    // While capturing, a memset would only be recorded; leave the report for the next uncaptured call.
    if (status == cudaStreamCaptureStatusNone) {
      slot->published = 0;  // before the flag is cleared: no kernel can publish again until then
      C10_CUDA_CHECK(cudaMemsetAsync(r->claim, 0, sizeof(unsigned int), stream));
    }
  }
  TORCH_CHECK_INDEX(false, op, ": an earlier cross-entropy kernel on cuda:", device, " got target ", value,
                    " at position ", position,
                    ", out of bounds (expected 0 <= target < classes or target == ignore_index); that row's loss "
                    "and gradient were written as NaN, and fused_train's optimizer steps on this device were "
                    "skipped since");
}

}  // namespace cuda
}  // namespace fused_train
