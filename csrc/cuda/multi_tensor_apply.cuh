// fused_train's multi-tensor launcher: one kernel launch updates many tensors of one call, each cut into
// chunks of kChunkSize elements, one chunk per block. It knows nothing about any optimizer: a functor says
// what to do with a chunk (see the "Functor contract" below), the launcher finds the chunk, runs the functor
// and, for functors that keep a step counter, advances each tensor's step once all blocks have read it.
//
// Shape taken from ATen's MultiTensorApply.cuh and apex's multi_tensor_apply, with these differences:
//  * per-tensor block offsets instead of per-block tables, so a launch holds any number of chunks (a
//    100M-element tensor is one launch of 1526 blocks, not five launches of 320) and more tensors per
//    launch fit in the 4 KB of kernel parameters (see max_tensors_per_launch);
//  * the step counter is advanced inside the same kernel ("last block done" ticket), not by an extra
//    foreach launch;
//  * the per-chunk code is __host__ __device__ and takes (thread, thread count) as arguments, so it can be
//    run and checked on the CPU.
#pragma once

// c10/cuda rather than ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS headers, which a
// minimal toolkit (or one whose math libraries come as pip wheels) does not have; we need only streams.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "fused_train/macros.h"

namespace fused_train {
namespace cuda {

// Elements per chunk (one block's work). 64K keeps a block busy for a few microseconds, long enough to
// hide its prologue, and small enough that 16 tensors of 1M elements still fill an H100 (256 blocks).
constexpr int64_t kChunkSize = 65536;
// Threads per block: 16 warps, enough loads in flight per SM to saturate HBM with 16-byte accesses.
constexpr int kBlockSize = 512;

// The classic limit on kernel parameters (CUDA < 12.1, or any pre-Volta GPU), which we keep so the
// extension builds and runs with any toolkit torch supports.
constexpr int kKernelParamBytes = 4096;
// Kernel-parameter bytes left for the functor (hyperparameters, scalar-tensor pointers) and the ticket slot.
constexpr int kFunctorParamBytes = 256;
// Blocks per launch. gridDim.x allows 2^31 - 1; 2^20 blocks (68.7G elements) keeps block offsets in
// int32 with room to spare. Larger tensors continue in the next launch.
constexpr int64_t kMaxBlocksPerLaunch = int64_t{1} << 20;

// Tensors per launch for `depth` lists: each tensor costs `depth` addresses + numel + step pointer
// (8 bytes each) + its first block (4 bytes); the fixed part is first_chunk, the closing block offset,
// n_tensors, n_finished and padding (32 bytes).
constexpr int max_tensors_per_launch(int depth) {
  return (kKernelParamBytes - kFunctorParamBytes - 32) / (8 * depth + 20);
}
static_assert(max_tensors_per_launch(2) == 105 && max_tensors_per_launch(5) == 63,
              "update the numbers quoted in the docs when the launch layout changes");

// What one launch covers: tensors ("slots") 0..n_tensors-1, slot s owning blocks
// [block_start[s], block_start[s + 1]). Slot 0 may continue a tensor begun in the previous launch
// (first_chunk > 0); the last slot may end before its tensor does (then n_finished = n_tensors - 1).
template <int Depth>
struct TensorListMetadata {
  static constexpr int kMaxTensors = max_tensors_per_launch(Depth);
  void* addresses[Depth][kMaxTensors];  // list k (param, grad, states...) of slot s
  int64_t numel[kMaxTensors];
  float* steps[kMaxTensors];  // per-tensor step counter (fp32, on the device), or nullptr
  int64_t first_chunk;        // chunk index, within its tensor, of slot 0's first block
  int32_t block_start[kMaxTensors + 1];
  int32_t n_tensors;
  int32_t n_finished;  // slots [0, n_finished) have their last chunk in this launch
};

// The chunk a block works on: elements [begin, begin + n) of slot `slot`. n is 0 only for the single
// block given to an empty tensor whose step must still advance.
struct BlockLocation {
  int slot;
  int64_t begin;
  int64_t n;
};

template <int Depth>
FT_HOST_DEVICE FT_INLINE BlockLocation locate_block(const TensorListMetadata<Depth>& m, int64_t block) {
  // The last slot whose first block is <= block (block_start is strictly increasing: every slot has at
  // least one block). At most log2(105) = 7 uniform steps over the parameter bank.
  int lo = 0;
  int hi = m.n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (m.block_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t chunk = (lo == 0 ? m.first_chunk : 0) + (block - m.block_start[lo]);
  const int64_t begin = chunk * kChunkSize;
  const int64_t left = m.numel[lo] - begin;
  return {lo, begin, left < kChunkSize ? left : kChunkSize};
}

// Functor contract (F is trivially copyable, at most kFunctorParamBytes - 4 bytes):
//   static constexpr bool kAdvancesSteps;     // the launcher advances per-tensor steps (needs step tensors)
//   struct BlockScalars { ... };             // plain data, no constructors (lives in shared memory)
//   BlockScalars block_scalars(float step_after) const;
//       run by one thread per block; step_after = the block's tensor step + 1 (0 without steps). Reads
//       the device scalars (lr, grad_scale, found_inf) once per block.
//   bool advances_steps(const BlockScalars&) const;    // false: leave every step as it is (e.g. found_inf)
//   void operator()(const TensorListMetadata<Depth>&, const BlockLocation&, const BlockScalars&,
//                   int thread, int n_threads) const;  // every thread of the block
// All four are __host__ __device__ so the chunk code can be exercised on the CPU.

template <int Depth, class Functor>
struct MultiTensorArgs {
  TensorListMetadata<Depth> meta;
  Functor functor;
  int32_t ticket_slot;  // index into step_tickets (unused without steps)
};

// Builds the launches of one call: calls launch(meta, n_blocks) for each group of up to max_tensors
// tensors and max_blocks blocks, in order. Tensors without elements get no block, except when they carry
// a step (steps non-empty), which must still advance. Host code; the limits are arguments so a CPU test
// can exercise tensor splits with small ones.
template <int Depth, class Launch>
void plan_launches(const std::array<at::TensorList, Depth>& lists, at::TensorList steps, int max_tensors,
                   int64_t max_blocks, Launch&& launch) {
  TORCH_INTERNAL_ASSERT(max_tensors >= 1 && max_tensors <= TensorListMetadata<Depth>::kMaxTensors);
  TORCH_INTERNAL_ASSERT(max_blocks >= 1 && max_blocks <= kMaxBlocksPerLaunch);
  TensorListMetadata<Depth> m{};
  int nt = 0;
  int64_t blocks = 0;
  const int64_t n = static_cast<int64_t>(lists[0].size());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = lists[0][i].numel();
    int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    if (chunks == 0) {
      if (steps.empty()) continue;
      chunks = 1;
    }
    int64_t done = 0;
    while (done < chunks) {
      if (nt == 0) m.first_chunk = done;
      for (int k = 0; k < Depth; ++k) m.addresses[k][nt] = lists[k][i].data_ptr();
      m.numel[nt] = numel;
      m.steps[nt] = steps.empty() ? nullptr : steps[i].data_ptr<float>();
      m.block_start[nt] = static_cast<int32_t>(blocks);
      const int64_t take = std::min(chunks - done, max_blocks - blocks);
      blocks += take;
      done += take;
      ++nt;
      if (nt == max_tensors || blocks == max_blocks) {
        m.n_tensors = nt;
        m.n_finished = done == chunks ? nt : nt - 1;
        m.block_start[nt] = static_cast<int32_t>(blocks);
        launch(static_cast<const TensorListMetadata<Depth>&>(m), blocks);
        nt = 0;
        blocks = 0;
      }
    }
  }
  if (nt > 0) {
    m.n_tensors = nt;
    m.n_finished = nt;
    m.block_start[nt] = static_cast<int32_t>(blocks);
    launch(static_cast<const TensorListMetadata<Depth>&>(m), blocks);
  }
}

// Everything below is private to each .cu file that includes this header (anonymous namespace): the
// ticket table is a __device__ array of that file's module, so the host bookkeeping of its slots must be
// that file's too.
namespace {

// Step tickets. Why a ticket: every block of a tensor reads its step t and uses t + 1, so the step may be
// written only after the last of those reads, and blocks run in no fixed order. Each block, after its
// work, takes a ticket (atomicInc); the block that takes the last one knows every other block has already
// read its step, and advances the steps of the tensors that end in this launch (those that continue in
// the next launch are advanced there; launches on one stream run one after another).
//
// Why a __device__ array and not an allocated counter: it is zero at module load on every device (PTX
// initialises .global variables to zero), needs
// no allocation (none on the first step, none inside a CUDA-graph capture) and no memset launch.
// atomicInc(ticket, gridDim.x - 1) wraps to 0 on the last ticket, so every finished launch leaves its
// ticket at 0 for the next one.
//
// Which ticket: launches that run one after another may share one; concurrent ones must not. Eager
// launches use one slot per (device, stream): a stream runs its kernels in order. A launch recorded into a
// CUDA graph gets a slot of its own for the life of the process, because a replay may run on any stream,
// concurrently with eager work or other graphs (a graph never runs concurrently with itself).
constexpr int kTicketSlots = 1 << 16;  // 256 KiB per device
__device__ unsigned int step_tickets[kTicketSlots];

struct TicketTable {
  std::mutex mutex;
  std::map<std::pair<c10::DeviceIndex, c10::StreamId>, int32_t> by_stream;
  std::map<c10::DeviceIndex, int32_t> next;  // slots handed out per device
};

inline int32_t ticket_slot(const c10::cuda::CUDAStream& stream, bool capturing) {
  static TicketTable* table = new TicketTable();  // leaked on purpose: no destruction-order questions at exit
  std::lock_guard<std::mutex> lock(table->mutex);
  const c10::DeviceIndex device = stream.device_index();
  if (!capturing) {
    auto it = table->by_stream.find({device, stream.id()});
    if (it != table->by_stream.end()) return it->second;
  }
  int32_t& next = table->next[device];
  TORCH_CHECK(next < kTicketSlots, "fused_train: all ", kTicketSlots, " step-counter slots of cuda:",
              static_cast<int>(device),
              " are taken (each optimizer launch captured in a CUDA graph keeps one for the life of the "
              "process, each stream one)");
  const int32_t slot = next++;
  if (!capturing) table->by_stream.emplace(std::make_pair(device, stream.id()), slot);
  return slot;
}

template <int Depth, class Functor>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_apply_kernel(const __grid_constant__ MultiTensorArgs<Depth, Functor> args) {
  using BlockScalars = typename Functor::BlockScalars;
  const TensorListMetadata<Depth>& m = args.meta;
  const BlockLocation loc = locate_block(m, static_cast<int64_t>(blockIdx.x));

  // One thread reads the step and the device scalars; the block shares them.
  __shared__ BlockScalars shared_scalars;
  if (threadIdx.x == 0) {
    float step_after = 0.0f;
    if constexpr (Functor::kAdvancesSteps) step_after = *m.steps[loc.slot] + 1.0f;  // torch: step_t += 1
    shared_scalars = args.functor.block_scalars(step_after);
  }
  __syncthreads();
  const BlockScalars scalars = shared_scalars;

  args.functor(m, loc, scalars, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));

  if constexpr (Functor::kAdvancesSteps) {
    // Thread 0 read this block's step above; the fence orders that read before the ticket (release).
    // The last ticket's fence (acquire) orders every block's read before the increments: no block can
    // see its tensor's step advanced. Only thread 0 takes part, so no further barrier is needed.
    if (threadIdx.x == 0) {
      __threadfence();
      unsigned int* ticket = &step_tickets[args.ticket_slot];
      if (atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1) {
        __threadfence();
        if (args.functor.advances_steps(scalars)) {
          // atomicAdd, not +=: two params may share one step tensor, and each advances it once, as
          // torch's foreach add does.
          for (int s = 0; s < m.n_finished; ++s) atomicAdd(m.steps[s], 1.0f);
        }
      }
    }
  }
}

}  // namespace

// Runs functor over every chunk of lists (list 0 decides the sizes; the other lists hold tensors of the
// same numel and layout, on the same device). steps: one fp32 step tensor per tensor on that device when
// Functor::kAdvancesSteps, else empty. Asynchronous on the current stream of the tensors' device.
template <int Depth, class Functor>
void multi_tensor_apply(const std::array<at::TensorList, Depth>& lists, at::TensorList steps,
                        const Functor& functor) {
  static_assert(Depth >= 1, "at least one tensor list");
  static_assert(sizeof(Functor) + sizeof(int32_t) <= kFunctorParamBytes, "functor exceeds its parameter budget");
  static_assert(sizeof(MultiTensorArgs<Depth, Functor>) <= kKernelParamBytes, "kernel parameters exceed 4 KB");
  static_assert(std::is_trivially_copyable_v<Functor>, "the functor is copied into kernel parameters");
  const auto n = lists[0].size();
  if (n == 0) return;
  for (int k = 1; k < Depth; ++k) TORCH_INTERNAL_ASSERT(lists[k].size() == n);
  TORCH_INTERNAL_ASSERT(steps.size() == (Functor::kAdvancesSteps ? n : 0));

  c10::cuda::OptionalCUDAGuard guard(lists[0][0].device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  int32_t slot = 0;
  bool capturing = false;
  if constexpr (Functor::kAdvancesSteps) {
    // cudaStreamIsCapturing rather than c10's capture-status helpers, whose names changed across the
    // torch versions we support.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
    capturing = status != cudaStreamCaptureStatusNone;
    if (!capturing) slot = ticket_slot(stream, false);
  }
  plan_launches<Depth>(lists, steps, TensorListMetadata<Depth>::kMaxTensors, kMaxBlocksPerLaunch,
                       [&](const TensorListMetadata<Depth>& meta, int64_t n_blocks) {
                         if (capturing) slot = ticket_slot(stream, true);
                         const MultiTensorArgs<Depth, Functor> args{meta, functor, slot};
                         multi_tensor_apply_kernel<Depth, Functor>
                             <<<static_cast<unsigned int>(n_blocks), kBlockSize, 0, stream.stream()>>>(args);
                         C10_CUDA_KERNEL_LAUNCH_CHECK();
                       });
}

}  // namespace cuda
}  // namespace fused_train
