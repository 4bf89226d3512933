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

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "cuda/launch_plan.h"
#include "fused_train/macros.h"

namespace fused_train {
namespace cuda {

// Threads per block: 16 warps, enough loads in flight per SM to saturate HBM with 16-byte accesses.
constexpr int kBlockSize = 512;

// A call's tensor lists as plan_launches (launch_plan.h) reads them.
template <int Depth>
struct TensorListsView {
  const std::array<at::TensorList, Depth>& lists;
  at::TensorList steps;  // empty, or one fp32 step tensor per tensor
  int64_t size() const { return static_cast<int64_t>(lists[0].size()); }
  int64_t numel(int64_t i) const { return lists[0][i].numel(); }
  void* address(int k, int64_t i) const { return lists[k][i].data_ptr(); }
  bool has_steps() const { return !steps.empty(); }
  float* step(int64_t i) const { return steps[i].data_ptr<float>(); }
  c10::ArrayRef<uint64_t> index_bases;  // empty, or one per tensor (launches with index bases)
  uint64_t index_base(int64_t i) const { return index_bases[i]; }
  c10::ArrayRef<int64_t> quant_rows;  // empty, or one per tensor (the 8-bit ops' launches)
  int64_t quant_row(int64_t i) const { return quant_rows[i]; }
};

// Functor contract (F is trivially copyable, at most kFunctorParamBytes - 16 bytes):
//   static constexpr bool kAdvancesSteps;     // the launcher advances per-tensor steps (needs step tensors)
//   struct BlockScalars { ... };             // plain data, no constructors (lives in shared memory)
//   BlockScalars block_scalars(float step_after) const;
//       run by one thread per block; step_after = the block's tensor step + 1 (0 without steps). Reads
//       the device scalars (lr, grad_scale, found_inf) once per block.
//   bool advances_steps(const BlockScalars&) const;    // false: leave every step as it is (e.g. found_inf)
//   template <class Meta>  // a TensorListMetadata, with or without index bases and quantization rows
//   void operator()(const Meta&, const BlockLocation&, const BlockScalars&, int thread, int n_threads) const;
//                                                       // every thread of the block
// All four are __host__ __device__ so the chunk code can be exercised on the CPU.

template <int Depth, class Functor, bool kIndexBases, bool kQuantRows>
struct MultiTensorArgs {
  TensorListMetadata<Depth, kIndexBases, kQuantRows> meta;
  Functor functor;
  unsigned int* captured_ticket;  // the ticket of a launch recorded in a CUDA graph, else nullptr
  int32_t ticket_slot;            // eager launches: index into step_tickets (unused without steps)
};

// Everything below is private to each .cu file that includes this header (anonymous namespace): the
// ticket table is a __device__ array of that file's module, so the host bookkeeping of its slots must be
// that file's too.
namespace {

// Step tickets. Why a ticket: every block of a tensor reads its step t and uses t + 1, so the step may be
// written only after the last of those reads, and blocks run in no fixed order. Each block, after its
// work, takes a ticket (atomicInc); the block that takes the last one knows every other block has already
// read its step, and advances the steps of the tensors that end in this launch (those that continue in
// the next launch are advanced there; launches on one stream run one after another).
// atomicInc(ticket, gridDim.x - 1) wraps to 0 on the last ticket, so every finished launch leaves its
// ticket at 0 for the next one.
//
// Which ticket: launches that run one after another may share one; concurrent ones must not.
//  * Eager launches use one slot of a __device__ array per (device, stream): a stream runs its kernels in
//    order, and the array is zero at module load on every device (PTX initialises .global variables), so
//    the hot path allocates nothing and launches no memset.
//  * A launch recorded into a CUDA graph may replay on any stream, concurrently with eager work or with
//    other graphs, so it must not share a slot; and a slot it held would stay taken after the graph is
//    destroyed (nothing tells us). Instead each captured call allocates its own zeroed ticket while
//    capturing: the allocation comes from the graph's private memory pool and the zeroing becomes a node
//    of the graph, so every replay starts from 0 and the memory goes when the graph goes. Within the pool
//    the allocator may hand the ticket's bytes to a later allocation of the same capture; that is safe for
//    the same reason it is for every temporary of a captured op: the graph orders their uses. Like every
//    torch op that allocates, this needs the capture to be torch's (torch.cuda.graph, CUDAGraph,
//    torch.compile), which gives the graph its pool; a raw cudaStreamBeginCapture does not.
constexpr int kTicketSlots = 1 << 16;  // 256 KiB per device; streams, not launches, take slots
__device__ unsigned int step_tickets[kTicketSlots];

struct TicketTable {
  std::mutex mutex;
  std::map<std::pair<c10::DeviceIndex, c10::StreamId>, int32_t> by_stream;
  std::map<c10::DeviceIndex, int32_t> next;  // slots handed out per device
};

inline int32_t eager_ticket_slot(const c10::cuda::CUDAStream& stream) {
  static TicketTable* table = new TicketTable();  // leaked on purpose: no destruction-order questions at exit
  std::lock_guard<std::mutex> lock(table->mutex);
  const c10::DeviceIndex device = stream.device_index();
  auto it = table->by_stream.find({device, stream.id()});
  if (it != table->by_stream.end()) return it->second;
  int32_t& next = table->next[device];
  TORCH_CHECK(next < kTicketSlots, "fused_train: the optimizer kernels have run on ", kTicketSlots,
              " different streams of cuda:", static_cast<int>(device),
              ", each of which keeps a step-counter slot; use fewer streams (torch.cuda.Stream() objects or "
              "external streams) for the optimizer step");
  const int32_t slot = next++;
  table->by_stream.emplace(std::make_pair(device, stream.id()), slot);
  return slot;
}

template <int Depth, class Functor, bool kIndexBases, bool kQuantRows>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_apply_kernel(const __grid_constant__ MultiTensorArgs<Depth, Functor, kIndexBases, kQuantRows> args) {
  using BlockScalars = typename Functor::BlockScalars;
  const TensorListMetadata<Depth, kIndexBases, kQuantRows>& m = args.meta;
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
      unsigned int* ticket =
          args.captured_ticket != nullptr ? args.captured_ticket : &step_tickets[args.ticket_slot];
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
// Functor::kAdvancesSteps, else empty. kIndexBases: index_bases holds one per tensor, each slot's
// TensorListMetadata::index_base (the functor must take metadata with them); else it is empty. kQuantRows: likewise
// quant_rows, each slot's TensorListMetadata::quant_row (the 8-bit ops'). Asynchronous on the current stream of the
// tensors' device.
template <int Depth, bool kIndexBases, bool kQuantRows, class Functor>
void multi_tensor_apply_impl(const std::array<at::TensorList, Depth>& lists, at::TensorList steps,
                             c10::ArrayRef<uint64_t> index_bases, c10::ArrayRef<int64_t> quant_rows,
                             const Functor& functor) {
  using Meta = TensorListMetadata<Depth, kIndexBases, kQuantRows>;
  using Args = MultiTensorArgs<Depth, Functor, kIndexBases, kQuantRows>;
  static_assert(Depth >= 1, "at least one tensor list");
  // The ticket pointer and slot after the functor take 16 bytes with padding (the contract above).
  static_assert(sizeof(Functor) + 16 <= kFunctorParamBytes, "functor exceeds its parameter budget");
  static_assert(sizeof(Args) <= kKernelParamBytes, "kernel parameters exceed 4 KB");
  static_assert(std::is_trivially_copyable_v<Functor>, "the functor is copied into kernel parameters");
  const auto n = lists[0].size();
  if (n == 0) return;
  for (int k = 1; k < Depth; ++k) TORCH_INTERNAL_ASSERT(lists[k].size() == n);
  TORCH_INTERNAL_ASSERT(steps.size() == (Functor::kAdvancesSteps ? n : 0));
  TORCH_INTERNAL_ASSERT(index_bases.size() == (kIndexBases ? n : 0));
  TORCH_INTERNAL_ASSERT(quant_rows.size() == (kQuantRows ? n : 0));

  c10::cuda::OptionalCUDAGuard guard(lists[0][0].device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  int32_t slot = 0;
  at::Tensor captured_ticket;
  if constexpr (Functor::kAdvancesSteps) {
    // cudaStreamIsCapturing rather than c10's capture-status helpers, whose names changed across the
    // torch versions we support.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
    if (status == cudaStreamCaptureStatusNone) {
      slot = eager_ticket_slot(stream);
    } else {
      // One ticket for all launches of this call: they run one after another.
      captured_ticket = at::zeros({1}, lists[0][0].options().dtype(at::kInt));
    }
  }
  unsigned int* ticket = captured_ticket.defined() ? static_cast<unsigned int*>(captured_ticket.data_ptr()) : nullptr;
  const TensorListsView<Depth> view{lists, steps, index_bases, quant_rows};
  plan_launches<Depth, kIndexBases, kQuantRows>(view, Meta::kMaxTensors, kMaxBlocksPerLaunch,
                                                [&](const Meta& meta, int64_t n_blocks) {
                                                  const Args args{meta, functor, ticket, slot};
                                                  multi_tensor_apply_kernel<Depth, Functor, kIndexBases, kQuantRows>
                                                      <<<static_cast<unsigned int>(n_blocks), kBlockSize, 0,
                                                         stream.stream()>>>(args);
                                                  C10_CUDA_KERNEL_LAUNCH_CHECK();
                                                });
}

template <int Depth, class Functor>
void multi_tensor_apply(const std::array<at::TensorList, Depth>& lists, at::TensorList steps,
                        const Functor& functor) {
  multi_tensor_apply_impl<Depth, false, false>(lists, steps, {}, {}, functor);
}

// With per-tensor index bases (one per tensor).
template <int Depth, class Functor>
void multi_tensor_apply(const std::array<at::TensorList, Depth>& lists, at::TensorList steps,
                        c10::ArrayRef<uint64_t> index_bases, const Functor& functor) {
  multi_tensor_apply_impl<Depth, true, false>(lists, steps, index_bases, {}, functor);
}

// The 8-bit ops': with each tensor's quantization row length (math::QuantRows), and with index bases or not.
template <int Depth, bool kIndexBases, class Functor>
void multi_tensor_apply_8bit(const std::array<at::TensorList, Depth>& lists, at::TensorList steps,
                             c10::ArrayRef<uint64_t> index_bases, c10::ArrayRef<int64_t> quant_rows,
                             const Functor& functor) {
  multi_tensor_apply_impl<Depth, kIndexBases, true>(lists, steps, index_bases, quant_rows, functor);
}

}  // namespace cuda
}  // namespace fused_train
