// Out-of-range class targets on CUDA. A kernel cannot raise, and a device-side assert (torch's answer) kills
// the CUDA context; waiting for the GPU on every loss call to check would stall the training loop. So:
//
//  * The loss kernel writes NaN for a bad row's loss and gradient, and reports the row: the first bad row
//    claims the report (an atomic, so one row wins), writes its position and value into pinned host
//    memory, fences, and only then publishes them. The host never pairs one row's position with another
//    row's value.
//  * Every bad row also sets the device's step guard. The next fused_train optimizer step on that device
//    is skipped, exactly as for GradScaler's found_inf (params, optimizer state and step counters untouched;
//    grads still zeroed when the step was to zero them), so the NaN gradients never reach the params
//    through it. Every launch of that step skips (the guard goes from 1 "bad target seen" to 2 "a step
//    skipped for it"), whatever the number of param groups, dtypes and launches; the next loss call clears
//    a guard at 2, so training goes on, with no host involved: this is what a replayed CUDA graph relies on.
//    A guard at 1 survives further loss calls (gradient accumulation) until a step consumes it.
//  * Every fused_train CUDA op (loss forward and backward, the gradient scaling of the loss's backward, the
//    optimizer steps) first looks at the published report, a read of host memory without synchronisation.
//    The first one that starts after the bad kernel has finished raises IndexError naming the position and
//    value, and re-arms: the claim and the guard are cleared on the current stream, behind the work queued
//    so far (a step queued before still skips; the first one after the exception runs). A report seen while the
//    current stream is capturing a graph raises without re-arming, so the next uncaptured call raises it
//    again. Rows of later bad batches are not reported before the host has taken the first report (their
//    steps are still skipped).
//
// Limits: the order is stream order, so the guarantee is for a loss and a step on one stream (a loss kernel
// on another stream may set the guard in the middle of an unrelated step, which some blocks then skip);
// the guard is per process, so under DDP the other ranks receive the NaN gradients through the all-reduce
// and step with them (GradScaler's inf check covers every rank); torch.optim's optimizers do not read the
// guard. A script that wants the error at a known point calls torch.cuda.synchronize() and then any
// fused_train op on the device.
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

// The device's words (device addresses).
struct BadTargetReport {
  unsigned int* claim;       // nonzero from the first bad row until the host takes the report
  unsigned int* step_guard;  // 0 clear; 1 a bad target since the last fused step; 2 a step skipped for it
  BadTargetSlot* slot;
};

// The report of `device`, created on first use (also while a CUDA graph is being captured, on any thread).
BadTargetReport bad_target_report(int device);

// The step guard the optimizer kernels of `device` read (see bad_target_skips_step).
unsigned int* bad_target_step_guard(int device);

// Raises IndexError (naming op, the device, the position and the value) if a loss kernel on `device` has
// published a bad target, and re-arms the report unless the current stream is capturing a CUDA graph.
// Reads host memory only: never waits for the GPU.
void raise_if_bad_target_seen(const char* op, int device);

#if defined(__CUDACC__)
// A loss kernel's bad row.
__device__ __forceinline__ void report_bad_target(const BadTargetReport& r, int64_t position, int64_t value) {
  atomicExch(r.step_guard, 1u);
  if (atomicCAS(r.claim, 0u, 1u) != 0u) return;  // another row holds the report
  volatile BadTargetSlot* slot = r.slot;
  slot->position = position;
  slot->value = value;
  __threadfence_system();  // position and value reach the host before the word that publishes them
  slot->published = 1;
}

// One thread of every loss forward, before any row: a guard that a skipped step consumed is cleared. Rows of
// this call that are bad set it again whether they run before or after (1 is never overwritten by this).
__device__ __forceinline__ void clear_consumed_step_guard(const BadTargetReport& r) { atomicCAS(r.step_guard, 2u, 0u); }

// One thread per optimizer block: whether the step is skipped for a bad target, marking the guard consumed.
__device__ __forceinline__ bool bad_target_skips_step(unsigned int* guard) {
  const unsigned int state = *static_cast<volatile unsigned int*>(guard);
  if (state == 1u) atomicCAS(guard, 1u, 2u);
  return state != 0u;
}
#endif

}  // namespace cuda
}  // namespace fused_train
