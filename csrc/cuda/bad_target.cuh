// Out-of-range class targets on CUDA. A kernel cannot raise, and a device-side assert (torch's answer) kills
// the CUDA context; waiting for the GPU on every loss call to check would stall the training loop. So:
//
//  * The loss's forward writes NaN for a bad row's loss and reports the row: the first bad row claims the
//    report (an atomic, so one row wins), writes its position and value into pinned host memory, fences,
//    and only then publishes them. The host never pairs one row's position with another row's value.
//  * The kernel that writes a bad row's gradient (NaN) sets the device's step guard. The next fused_train
//    optimizer step on that device is skipped, exactly as for GradScaler's found_inf (params, optimizer
//    state and step counters untouched; grads still zeroed when the step was to zero them), so the NaN
//    gradients never reach the params through it. Every launch of that step skips (the guard goes from 1
//    "NaN gradients since the last fused step" to 2 "a step skipped for them"), whatever the number of
//    param groups, dtypes, launches and fused optimizers stepping before the next loss; the next loss
//    forward clears a guard at 2, so training goes on with no host involved, as a replayed CUDA graph needs.
//    A guard at 1 survives further loss calls (gradient accumulation) until a step consumes it, and the host
//    never clears it: a script that catches the IndexError below before the step ran and goes on loses its
//    next step instead (the NaN gradients may still sit in .grad). A forward without gradient (evaluation)
//    reports but does not set the guard.
//  * Every fused_train CUDA op (loss forward and backward, the gradient scaling of the loss's backward, the
//    optimizer steps) first looks at the published report, a read of host memory without synchronisation.
//    The first one that starts after the bad kernel has finished raises IndexError naming the position and
//    value, and re-arms the report (its claim is cleared on the current stream). A report seen while the
//    current stream is capturing a graph raises without re-arming, so the next uncaptured call raises it
//    again. Rows of later bad batches are not reported before the host has taken the first report (their
//    steps are still skipped).
//
// Limits: the guard is one word per device, consumed by the first fused step that runs after the bad
// gradient in stream order. So the guarantee is for a loss and a step on one stream and one device: a loss on
// another stream may set the guard in the middle of an unrelated step, which some blocks then skip (an 8-bit
// step's blocks then race: a block updating a quantization block that runs into the next chunk, and the next
// chunk's block zeroing those gradients when it skips); params
// on other devices than the loss's step with the NaN gradients that flowed back to them; an optimizer that
// steps only every few losses (a second optimizer on another schedule) is not covered once the first one
// consumed the guard and a loss cleared it; under DDP the other ranks receive the NaN gradients through the
// all-reduce. GradScaler's inf check covers all of these, and torch.optim's optimizers do not read the guard.
// A script that wants the error at a known point calls torch.cuda.synchronize() and then any fused_train op
// on the device.
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
  unsigned int* step_guard;  // 0 clear; 1 NaN gradients since the last fused step; 2 a step skipped for them
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
// The loss forward's bad row.
__device__ __forceinline__ void report_bad_target(const BadTargetReport& r, int64_t position, int64_t value) {
  if (atomicCAS(r.claim, 0u, 1u) != 0u) return;  // another row holds the report
  volatile BadTargetSlot* slot = r.slot;
  slot->position = position;
  slot->value = value;
  __threadfence_system();  // position and value reach the host before the word that publishes them
  slot->published = 1;
}

// The loss backward's bad row: its gradient is NaN, so the next fused step must not run.
__device__ __forceinline__ void guard_nan_gradient(const BadTargetReport& r) { atomicExch(r.step_guard, 1u); }

// One thread of every loss forward, before any row: a guard that a skipped step consumed is cleared (the
// gradient kernel of this call, if any, runs after it and may set it again; a 1 is never cleared here).
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
