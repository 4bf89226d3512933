// How the multi-tensor launcher (multi_tensor_apply.cuh) cuts one call into launches and finds each block's
// chunk: the launch metadata, plan_launches (host) and locate_block (device). Free of torch and of CUDA, so
// tests/cpp/test_launch_plan.cpp checks random plans on the CPU, including the splits that need 2^20 chunks
// on a GPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fused_train/macros.h"

namespace fused_train {
namespace cuda {

// Elements per chunk (one block's work). 64K keeps a block busy for a few microseconds, long enough to
// hide its prologue, and small enough that 16 tensors of 1M elements still fill an H100 (256 blocks).
constexpr int64_t kChunkSize = 65536;

// The classic limit on kernel parameters (CUDA < 12.1, or any pre-Volta GPU), which we keep so the
// extension builds and runs with any toolkit torch supports.
constexpr int kKernelParamBytes = 4096;
// Kernel-parameter bytes left for the functor (hyperparameters, scalar-tensor pointers) and the ticket.
constexpr int kFunctorParamBytes = 256;
// Blocks per launch. gridDim.x allows 2^31 - 1; 2^20 blocks (68.7G elements) keeps block offsets in
// int32 with room to spare. Larger tensors continue in the next launch.
constexpr int64_t kMaxBlocksPerLaunch = int64_t{1} << 20;

// Tensors per launch for `depth` lists: each tensor costs `depth` addresses + numel + step pointer
// (8 bytes each) + its first block (4 bytes), and its index base and its quantization row length (8 bytes each)
// in a launch that has them; the fixed part is first_chunk, the closing block offset, n_tensors, n_finished and
// padding (32 bytes).
constexpr int max_tensors_per_launch(int depth, bool index_bases = false, bool quant_rows = false) {
  return (kKernelParamBytes - kFunctorParamBytes - 32) /
         (8 * depth + 20 + (index_bases ? 8 : 0) + (quant_rows ? 8 : 0));
}
static_assert(max_tensors_per_launch(2) == 105 && max_tensors_per_launch(5) == 63,
              "update the numbers quoted in the docs when the launch layout changes");

// Per-slot index bases, in the launches of a call that has them (stochastic rounding of shards: the index in the
// whole tensor of each shard's element 0); other launches carry none, and lose no tensor per launch to them.
template <int N, bool kIndexBases>
struct SlotIndexBases {
  uint64_t index_base[N];
};
template <int N>
struct SlotIndexBases<N, false> {};

// Per-slot quantization row lengths, in the launches of the 8-bit ops: the elements per row of the slot's blocks
// (math::QuantRows), which its chunks walk.
template <int N, bool kQuantRows>
struct SlotQuantRows {
  int64_t quant_row[N];
};
template <int N>
struct SlotQuantRows<N, false> {};

// What one launch covers: tensors ("slots") 0..n_tensors-1, slot s owning blocks
// [block_start[s], block_start[s + 1]). Slot 0 may continue a tensor begun in the previous launch
// (first_chunk > 0); the last slot may end before its tensor does (then n_finished = n_tensors - 1).
template <int Depth, bool kIndexBases = false, bool kQuantRows = false>
struct TensorListMetadata
    : SlotIndexBases<max_tensors_per_launch(Depth, kIndexBases, kQuantRows), kIndexBases>,
      SlotQuantRows<max_tensors_per_launch(Depth, kIndexBases, kQuantRows), kQuantRows> {
  static constexpr int kMaxTensors = max_tensors_per_launch(Depth, kIndexBases, kQuantRows);
  static constexpr int kDepth = Depth;
  static constexpr bool kHasIndexBases = kIndexBases;
  static constexpr bool kHasQuantRows = kQuantRows;
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

template <class Meta>
FT_HOST_DEVICE FT_INLINE BlockLocation locate_block(const Meta& m, int64_t block) {
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

// Builds the launches of one call: calls launch(meta, n_blocks) for each group of up to max_tensors tensors
// and max_blocks blocks, in order. `tensors` describes the call:
//   int64_t size() const;                        the number of tensors
//   int64_t numel(int64_t i) const;              elements of tensor i (every list alike)
//   void* address(int k, int64_t i) const;       tensor i of list k
//   bool has_steps() const;  float* step(int64_t i) const;   per-tensor step counters, if any
//   uint64_t index_base(int64_t i) const;        with kIndexBases only: tensor i's index base
//   int64_t quant_row(int64_t i) const;          with kQuantRows only: tensor i's quantization row length
// Tensors without elements get no block, except when they carry a step, which must still advance. The
// limits are arguments so that the CPU test can reach tensor splits with small ones.
template <int Depth, bool kIndexBases = false, bool kQuantRows = false, class Tensors, class Launch>
void plan_launches(const Tensors& tensors, int max_tensors, int64_t max_blocks, Launch&& launch) {
  using Meta = TensorListMetadata<Depth, kIndexBases, kQuantRows>;
  if (max_tensors < 1 || max_tensors > Meta::kMaxTensors || max_blocks < 1 ||
      max_blocks > kMaxBlocksPerLaunch) {
    throw std::logic_error("plan_launches: limits out of range (max_tensors " + std::to_string(max_tensors) +
                           ", max_blocks " + std::to_string(max_blocks) + ")");
  }
  Meta m{};
  int nt = 0;
  int64_t blocks = 0;
  const int64_t n = tensors.size();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = tensors.numel(i);
    int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    if (chunks == 0) {
      if (!tensors.has_steps()) continue;
      chunks = 1;
    }
    int64_t done = 0;
    while (done < chunks) {
      if (nt == 0) m.first_chunk = done;
      for (int k = 0; k < Depth; ++k) m.addresses[k][nt] = tensors.address(k, i);
      m.numel[nt] = numel;
      m.steps[nt] = tensors.has_steps() ? tensors.step(i) : nullptr;
      if constexpr (kIndexBases) m.index_base[nt] = tensors.index_base(i);
      if constexpr (kQuantRows) m.quant_row[nt] = tensors.quant_row(i);
      m.block_start[nt] = static_cast<int32_t>(blocks);
      const int64_t take = std::min(chunks - done, max_blocks - blocks);
      blocks += take;
      done += take;
      ++nt;
      if (nt == max_tensors || blocks == max_blocks) {
        m.n_tensors = nt;
        m.n_finished = done == chunks ? nt : nt - 1;
        m.block_start[nt] = static_cast<int32_t>(blocks);
        launch(static_cast<const Meta&>(m), blocks);
        nt = 0;
        blocks = 0;
      }
    }
  }
  if (nt > 0) {
    m.n_tensors = nt;
    m.n_finished = nt;
    m.block_start[nt] = static_cast<int32_t>(blocks);
    launch(static_cast<const Meta&>(m), blocks);
  }
}

}  // namespace cuda
}  // namespace fused_train
