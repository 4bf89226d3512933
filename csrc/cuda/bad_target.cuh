// Out-of-range class targets on CUDA. A kernel cannot raise, and a device-side assert (torch's answer) kills
// the CUDA context; waiting for the GPU on every loss call to check would stall the training loop. So:
//
//  * The loss kernel writes NaN for a bad row's loss and gradient and reports the row: the first bad row of
//    any kernel claims a device flag (an atomic, so one row wins), writes its position and value into
//    pinned host memory, fences, and only then publishes them. The host therefore never pairs one row's
//    position with another's value.
//  * While the flag is set, fused_train's optimizer kernels on that device skip their step, exactly as for
//    GradScaler's found_inf: params, optimizer state and step counters stay as they were (grads are still
//    zeroed when the step was asked to zero them). The NaN gradients never reach the params through them.
//  * Every fused_train CUDA op (loss forward and backward, the gradient scaling of the loss's backward, the
//    optimizer steps) first looks at the published report, a read of host memory without synchronisation.
//    The first one that starts after the bad kernel has finished raises IndexError naming the position and
//    value, and re-arms the report: the flag is cleared on the current stream behind all work queued so far.
//
// With torch.optim's optimizers the NaN gradients do reach the params (their kernels do not read our flag),
// unless GradScaler's inf check skips the step. A script that wants the error at a known point calls
// torch.cuda.synchronize() and then any fused_train op.
#pragma once

#include <cstdint>

namespace fused_train {
namespace cuda {

// The report in mapped pinned host memory; `published` is written last.
struct BadTargetSlot {
  int64_t position;
  int64_t value;
  int64_t published;  // 0: nothing to report
};

// What a loss kernel needs to report a bad row (device addresses).
struct BadTargetReport {
  unsigned int* claim;  // device flag: nonzero from the first bad row until the host re-arms it
  BadTargetSlot* slot;
};

// The report of `device`, created on first use (also while a CUDA graph is being captured, on any thread).
BadTargetReport bad_target_report(int device);

// The device flag the optimizer kernels of `device` read: nonzero means skip the step.
const unsigned int* bad_target_claim(int device);

// Raises IndexError (naming op, the device, the position and the value) if a loss kernel on `device` has
// published a bad target, and re-arms the report unless the current stream is capturing a CUDA graph.
// Reads host memory only: never waits for the GPU.
void raise_if_bad_target_seen(const char* op, int device);

#if defined(__CUDACC__)
__device__ __forceinline__ void report_bad_target(const BadTargetReport& r, int64_t position, int64_t value) {
  if (atomicCAS(r.claim, 0u, 1u) != 0u) return;  // another row holds the report
  volatile BadTargetSlot* slot = r.slot;
  slot->position = position;
  slot->value = value;
  __threadfence_system();  // position and value reach the host before the word that publishes them
  slot->published = 1;
}
#endif

}  // namespace cuda
}  // namespace fused_train
