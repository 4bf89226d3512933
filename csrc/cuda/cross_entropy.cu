// CUDA implementations of the cross-entropy ops. The math is fused_train/xent_math.h (the CPU kernels run
// the same functions); this file spreads rows over threads.
//
// A row goes to a group of threads: 1 to 32 lanes of a warp for up to kWarpClasses classes, else a whole block
// (row_groups). Each thread reads its share as row_runs.h cuts it (16-byte vectors, kPacksInFlight loads in
// flight) and folds it into a math::RowState, one comparison with the running max per vector and one exp per
// logit; the group combines the states with shuffles (and the block through shared memory). Forward: a group
// per row, or per slice of a row when rows are too few to fill the GPU (the split-vocabulary path, whose
// partial states a second small kernel combines). Backward: a group per row or row slice, recomputing the row's
// constants from the saved (shift, log_sum), then one read of the logits and one write of the gradient per
// element. The training step's forward (forward_backward: the loss and its gradient for grad_loss = 1) runs
// both passes in one kernel, the second read of a row from L2. All are compiled apart for the losses with a
// linear term (label smoothing, probabilities), so the common loss reads nothing per element but its logit.
// (N, C, d…) logits in their (batch, classes, positions) layout take kernels of their own, a thread per row
// (cross_entropy_positions_*_kernel).
//
// Class indices outside [0, C) that are not ignore_index cannot raise inside a kernel without a device
// assert (which kills the context): the row's loss and gradient are written as NaN and the row is reported
// through bad_target.cuh, which says when the IndexError comes and what happens to the step meanwhile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cross_entropy_args.h"
#include "cuda/bad_target.cuh"
#include "cuda/row_runs.h"
#include "fused_train/xent_math.h"

namespace fused_train {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Backward slice of a row per block: kThreads threads × 4 vectors of 16 bytes (fp32: 8192 logits).
constexpr int kVectorsPerThread = kPacksInFlight;
// Both kernels stride over their work items with at most this many blocks per SM, so the grid never nears
// gridDim.x's 2^31 - 1, however many rows. 24 is a whole number of waves for 1, 2, 3 or 4 resident blocks
// per SM (min_blocks_per_sm: 2 or 1): equal work per block leaves no partial last wave.
constexpr int64_t kBlocksPerSm = 24;
// Resident blocks per SM asked of ptxas. Two (32 warps) cap registers at 64 per thread: with kPacksInFlight
// 16-byte loads per thread that is 64 KiB in flight per SM, well above what HBM's latency asks (~25 KiB on an
// H100); left alone, ptxas gave the fp16/bf16 kernels 90-105 registers, one block. The Linear and fp64 kernels
// would spill in their inner loops at 64, so they keep one block (32 KiB in flight).
template <class T, bool Linear>
constexpr int min_blocks_per_sm() {
  return Linear || sizeof(T) == 8 ? 1 : 2;
}

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

unsigned grid_blocks(int64_t items, int sms) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(items, kBlocksPerSm * sms)));
}

template <class T>
using Opmath = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---------------------------------------------------------------------------------------------------
template <class T, class O>
struct XentArgs {
  const T* logits;
  int64_t logits_row_stride;
  int64_t rows, classes;
  // > 0: the (batch, classes, positions) layout of cpu_kernels.h's CrossEntropyLaunch (logits, gradient and
  // probabilities; the row strides unused): row r's class j at (r / positions)·classes·positions + r % positions
  // + j·positions (PositionRows).
  int64_t positions;
  const void* target;  // int64/int32 indices, or T probabilities
  int64_t target_row_stride;
  bool target_is_prob, target_is_int32;
  const O* weight;            // nullptr: unweighted (never nullptr when a linear term is needed)
  const O* class_weight_sum;  // nullptr: C
  int64_t ignore_index;
  double label_smoothing, lse_square_scale;
  BadTargetReport bad_target;
  // forward
  O* row_lse;  // (rows, 2)
  O* row_loss;
  O* row_z_loss;
  O* row_weight;
  O* partial;  // (rows, splits, 4) for the split-vocabulary path
  int splits;
  // backward
  T* grad;
  int64_t grad_row_stride;
  const O* grad_loss;
  int64_t grad_loss_stride;
  const O* denominator;
  const O* target_mass;  // probabilities: Σ_c w_c·t'_c per row
  bool keep_unit_rows;   // leave the rows whose grad_loss is exactly 1 (they hold the forward's gradient)
};

template <class T, class O>
__device__ __forceinline__ math::XentHyper<O> xent_hyper(const XentArgs<T, O>& a) {
  const O weight_sum = a.class_weight_sum != nullptr ? *a.class_weight_sum : static_cast<O>(a.classes);
  return {static_cast<O>(1.0 - a.label_smoothing), static_cast<O>(a.label_smoothing / static_cast<double>(a.classes)),
          weight_sum, static_cast<O>(a.lse_square_scale), a.label_smoothing > 0.0};
}

template <class T, class O>
__device__ __forceinline__ int64_t read_index(const XentArgs<T, O>& a, int64_t row) {
  return a.target_is_int32 ? static_cast<const int32_t*>(a.target)[row * a.target_row_stride]
                           : static_cast<const int64_t*>(a.target)[row * a.target_row_stride];
}

// Threads per row. A row of more than kWarpClasses classes takes a whole block (and several blocks, each a
// slice of it, when rows are too few to fill the GPU); a smaller row takes a group of 1, 2, 4, ..., 32 lanes
// of a warp, the smallest giving each lane at most kClassesPerLane classes, so that a row of 21 classes
// (segmentation) or 1000 does not leave most of a 512-thread block idle behind two barriers. Groups of lanes
// are used only where they make two blocks per SM; fewer rows go a block each, as long ones do.
constexpr int64_t kWarpClasses = 8192;
constexpr int64_t kClassesPerLane = 16;
// The fused forward + backward kernel's limit instead of kWarpClasses, in bytes (run_forward_backward_cuda).
constexpr int64_t kFusedWarpRowBytes = 8192;

struct RowGroups {
  bool block;     // kThreads threads per row (slice); else 2^lanes_log2 lanes of a warp per row
  int lanes_log2;
};

RowGroups row_groups(int64_t rows, int64_t classes, int sms, int64_t warp_classes = kWarpClasses) {
  if (classes > warp_classes) return {true, 0};
  int lanes_log2 = 0;
  while (lanes_log2 < 5 && (kClassesPerLane << lanes_log2) < classes) ++lanes_log2;
  const int64_t blocks = (rows + (kThreads >> lanes_log2) - 1) / (kThreads >> lanes_log2);
  if (blocks < 2 * static_cast<int64_t>(sms)) return {true, 0};
  return {false, lanes_log2};
}

// The kernels take a group's work items (row, or row slice) in turn: items first, first + stride, ...
struct GroupSpan {
  int lane, lanes;
  int64_t first, stride;
};

template <bool kBlock>
__device__ __forceinline__ GroupSpan group_span(int lanes_log2) {
  if (kBlock) return {static_cast<int>(threadIdx.x), kThreads, blockIdx.x, gridDim.x};
  const int per_block = kThreads >> lanes_log2;
  return {static_cast<int>(threadIdx.x & ((1u << lanes_log2) - 1)), 1 << lanes_log2,
          static_cast<int64_t>(blockIdx.x) * per_block + (threadIdx.x >> lanes_log2),
          static_cast<int64_t>(gridDim.x) * per_block};
}

// Blocks for `items` work items (rows or row slices) of the groups' size: a block per item, or kThreads / lanes
// items per block.
unsigned group_grid(const RowGroups& groups, int64_t items, int sms) {
  const int64_t per_block = groups.block ? 1 : kThreads >> groups.lanes_log2;
  return grid_blocks((items + per_block - 1) / per_block, sms);
}

// with_linear calls f(std::bool_constant<Linear>{}) for the call's loss (Linear: a linear term, for probabilities
// or label smoothing), with_kernel_kind f(…<Linear>{}, std::bool_constant<Block>{}) for its loss and groups. The
// kernels are compiled for each, so the common loss (class indices, no smoothing) carries no per-element
// coefficient loads or branches.
template <class F>
void with_linear(const CrossEntropyCall& c, double label_smoothing, F&& f) {
  if (c.target_is_prob || label_smoothing > 0.0) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <class F>
void with_kernel_kind(const CrossEntropyCall& c, double label_smoothing, const RowGroups& groups, F&& f) {
  with_linear(c, label_smoothing, [&](auto linear) {
    groups.block ? f(linear, std::true_type{}) : f(linear, std::false_type{});
  });
}

template <bool Linear, class O>
__device__ __forceinline__ math::RowState<O> shuffle_xor(const math::RowState<O>& s, int offset, unsigned mask) {
  if (!Linear) return {__shfl_xor_sync(mask, s.max, offset), __shfl_xor_sync(mask, s.sum, offset), O(0), O(0)};
  return {__shfl_xor_sync(mask, s.max, offset), __shfl_xor_sync(mask, s.sum, offset),
          __shfl_xor_sync(mask, s.dot, offset), __shfl_xor_sync(mask, s.asum, offset)};
}

// The lanes of this thread's group of `lanes` (a power of two up to 32, aligned within the warp).
__device__ __forceinline__ unsigned group_mask(int lanes) {
  return lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u) << ((threadIdx.x % 32) & ~(lanes - 1u));
}

// Combines the states of a group of `lanes` lanes of one warp (a power of two up to 32, aligned): valid in every
// lane. Only the group's lanes take part, so groups of one warp may be at different items.
template <bool Linear, class O>
__device__ __forceinline__ math::RowState<O> group_combine(math::RowState<O> st, int lanes) {
  const unsigned mask = group_mask(lanes);
  for (int offset = lanes / 2; offset > 0; offset >>= 1) st = math::combine(st, shuffle_xor<Linear>(st, offset, mask));
  return st;
}

// Combines every thread's state; the result is valid in every thread. The caller passes a __syncthreads()
// before the next call (the shared words are written again).
template <bool Linear, class O>
__device__ math::RowState<O> block_combine(math::RowState<O> st) {
  __shared__ O shared[4][kWarps];
  st = group_combine<Linear>(st, 32);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared[0][warp] = st.max;
    shared[1][warp] = st.sum;
    shared[2][warp] = st.dot;
    shared[3][warp] = st.asum;
  }
  __syncthreads();
  // Every warp combines the kWarps states, in the same order, so every thread holds the same bits.
  st = lane < kWarps ? math::RowState<O>{shared[0][lane], shared[1][lane], shared[2][lane], shared[3][lane]}
                     : math::empty_row_state<O>();
  return group_combine<Linear>(st, 32);
}

// A group's combined state, valid in every thread of the group.
template <bool Linear, bool kBlock, class O>
__device__ __forceinline__ math::RowState<O> combine_group(const math::RowState<O>& st, int lanes) {
  if (kBlock) return block_combine<Linear>(st);
  return group_combine<Linear>(st, lanes);
}

// A row's target: its class index (-1 for probabilities), and whether it is ignore_index or out of [0, C) (a bad
// target: NaN loss and gradient, reported). Every kernel classifies a row through this.
struct RowTarget {
  int64_t index;
  bool ignored, bad;
  __device__ __forceinline__ bool kept() const { return index >= 0 && !ignored && !bad; }
};

template <class T, class O>
__device__ __forceinline__ RowTarget read_row_target(const XentArgs<T, O>& a, int64_t row) {
  if (a.target_is_prob) return {-1, false, false};
  const int64_t t = read_index(a, row);
  const bool ignored = t == a.ignore_index;
  return {t, ignored, !ignored && (t < 0 || t >= a.classes)};
}

// The logit of a kept class-index target, or 0.
template <class T, class O>
__device__ __forceinline__ O read_target_logit(const XentArgs<T, O>& a, int64_t row, const RowTarget& target) {
  return target.kept() ? static_cast<O>(a.logits[row * a.logits_row_stride + target.index]) : O(0);
}

// Turns a row's combined state into its outputs (one thread per row). target_logit: read_target_logit's.
template <class T, class O>
__device__ void write_row_outputs(const XentArgs<T, O>& a, int64_t row, const math::RowState<O>& st,
                                  const RowTarget& target, O target_logit) {
  const math::XentHyper<O> h = xent_hyper(a);
  const math::RowLse<O> lse = math::finish_row(st);
  O loss = 0, row_weight = 0;
  if (a.target_is_prob) {
    loss = math::prob_row_loss(st, lse, h);
    row_weight = 1;
  } else if (target.bad) {
    report_bad_target(a.bad_target, row, target.index);
    loss = std::numeric_limits<O>::quiet_NaN();
  } else if (!target.ignored) {
    row_weight = a.weight != nullptr ? a.weight[target.index] : O(1);
    loss = math::index_row_loss(st, lse, target_logit, row_weight, h);
  }
  a.row_lse[2 * row] = lse.shift;
  a.row_lse[2 * row + 1] = lse.log_sum;
  a.row_loss[row] = loss;
  a.row_z_loss[row] = target.ignored ? O(0) : math::z_loss(lse, h);
  a.row_weight[row] = row_weight;
}

// A row's outputs from its combined state, the target read here (the forward alone: nothing writes the logits).
template <class T, class O>
__device__ __forceinline__ void finish_row_outputs(const XentArgs<T, O>& a, int64_t row, const math::RowState<O>& st) {
  const RowTarget target = read_row_target(a, row);
  write_row_outputs(a, row, st, target, read_target_logit(a, row, target));
}

// The linear coefficient a_j of a row's element j (Linear kernels only): w_j, times t'_j for probabilities.
template <class T, class O>
__device__ __forceinline__ O linear_coef(const O* weight, const T* target_row, int64_t j, const math::XentHyper<O>& h) {
  const O w = weight[j];
  return target_row != nullptr ? w * math::smoothed_target(static_cast<O>(target_row[j]), h) : w;
}

// This thread's share of the slice [begin, begin + n) of a row, folded into a state (not yet combined).
template <bool Linear, class T, class O>
__device__ __forceinline__ math::RowState<O> fold_slice(const XentArgs<T, O>& a, const math::XentHyper<O>& h,
                                                        int64_t row, int64_t begin, int64_t n, const GroupSpan& span) {
  constexpr int K = Pack<T>::kSize;
  const T* x = a.logits + row * a.logits_row_stride + begin;
  const T* target_row =
      Linear && a.target_is_prob ? static_cast<const T*>(a.target) + row * a.target_row_stride + begin : nullptr;
  const O* weight = Linear ? a.weight + begin : nullptr;
  math::RowState<O> st = math::empty_row_state<O>();
  for_each_run(
      x, n, span.lane, span.lanes,
      [&](int64_t j) {
        const O xj = static_cast<O>(x[j]);
        const O aj = Linear ? linear_coef(weight, target_row, j, h) : O(0);
        math::accumulate_run<Linear, 1>(st, &xj, &aj);
      },
      [&](int64_t j, const Pack<T>& pack) {
        O xs[K], as[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          xs[k] = static_cast<O>(pack.v[k]);
          as[k] = Linear ? linear_coef(weight, target_row, j + k, h) : O(0);
        }
        math::accumulate_run<Linear, K>(st, xs, as);
      });
  return st;
}

// A row's gradient constants and its target.
template <class O>
struct RowGradient {
  math::RowGrad<O> rg;
  RowTarget target;
};

// scale: grad_loss_r / denominator (math::mean_scale); target_mass: Σ_c w_c·t'_c of a probability row.
template <class T, class O>
__device__ __forceinline__ RowGradient<O> row_gradient(const XentArgs<T, O>& a, const math::XentHyper<O>& h,
                                                       const RowTarget& target, O scale, const math::RowLse<O>& lse,
                                                       O target_mass) {
  if (a.target_is_prob) return {math::prob_row_grad(scale, lse, target_mass, h), target};
  const O target_weight = target.kept() && a.weight != nullptr ? a.weight[target.index] : O(1);
  return {math::index_row_grad(scale, lse, target_weight, h), target};
}

// Writes this thread's share of the gradient of the slice [begin, begin + n) of a row. The share is the one
// fold_slice reads (for_each_run over the same logits), so in place every element is read and then written by
// the same thread.
template <bool Linear, class T, class O>
__device__ __forceinline__ void write_slice_gradient(const XentArgs<T, O>& a, const math::XentHyper<O>& h,
                                                     int64_t row, int64_t begin, int64_t n, const RowGradient<O>& r,
                                                     const GroupSpan& span) {
  constexpr int K = Pack<T>::kSize;
  const T* x = a.logits + row * a.logits_row_stride + begin;
  T* g = a.grad + row * a.grad_row_stride + begin;
  if (r.target.ignored || r.target.bad) {
    // 0 for an ignored row, NaN for a bad target; the logits are not read.
    const T fill = r.target.ignored ? T(0) : static_cast<T>(std::numeric_limits<O>::quiet_NaN());
    Pack<T> fills;
#pragma unroll
    for (int k = 0; k < K; ++k) fills.v[k] = fill;
    for_each_run(
        static_cast<const T*>(g), n, span.lane, span.lanes, [&](int64_t j) { g[j] = fill; },
        [&](int64_t j, const Pack<T>&) { store_pack(g + j, fills); });
    return;
  }
  // The slice's element of the target class, if it has it; -1 never matches.
  const int64_t t = r.target.index;
  const int64_t target_at = t >= begin && t < begin + n ? t - begin : -1;
  const T* target_row =
      Linear && a.target_is_prob ? static_cast<const T*>(a.target) + row * a.target_row_stride + begin : nullptr;
  const O* weight = Linear ? a.weight + begin : nullptr;
  const math::RowGrad<O>& rg = r.rg;
  // Element j's gradient in opmath, the true class's term included, then its one rounding.
  const auto grad_at = [&](int64_t j, O xj, bool is_target) -> T {
    const O aj = Linear ? linear_coef(weight, target_row, j, h) : O(0);
    const O gj = math::grad_element(xj, aj, rg.shift, rg.log_sum, rg.softmax_coef, rg.linear_coef);
    return static_cast<T>(is_target ? gj - rg.target_coef : gj);
  };
  // Vector stores need the gradient row to share the logits' alignment (always so in place, and for the
  // usual dense layouts); otherwise elements go one by one.
  if (reinterpret_cast<uintptr_t>(x) % 16 == reinterpret_cast<uintptr_t>(g) % 16) {
    for_each_run(
        x, n, span.lane, span.lanes, [&](int64_t j) { g[j] = grad_at(j, static_cast<O>(x[j]), j == target_at); },
        [&](int64_t j, const Pack<T>& in) {
          // The target's position in this vector, or -1: one 64-bit comparison per vector.
          const int target_k =
              static_cast<uint64_t>(target_at - j) < static_cast<uint64_t>(K) ? static_cast<int>(target_at - j) : -1;
          Pack<T> out;
#pragma unroll
          for (int k = 0; k < K; ++k) out.v[k] = grad_at(j + k, static_cast<O>(in.v[k]), k == target_k);
          store_pack(g + j, out);
        });
  } else {
    for (int64_t j = span.lane; j < n; j += span.lanes) g[j] = grad_at(j, static_cast<O>(x[j]), j == target_at);
  }
}

// Work item b = (row b / splits, split b % splits): a group folds that slice of the row, and with one split
// finishes the row itself (splits > 1 only with kBlock). Groups stride over the items (a grid of at most
// grid_blocks() blocks).
template <class T, class O, bool Linear, bool kBlock>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T, Linear>())
    cross_entropy_forward_kernel(XentArgs<T, O> a, int lanes_log2) {
  const math::XentHyper<O> h = xent_hyper(a);
  const int64_t splits = kBlock ? a.splits : 1;  // groups of lanes never split (and skip the divisions)
  const int64_t slice = (a.classes + splits - 1) / splits;
  if (blockIdx.x == 0 && threadIdx.x == 0) clear_consumed_step_guard(a.bad_target);
  const GroupSpan span = group_span<kBlock>(lanes_log2);
  for (int64_t b = span.first; b < a.rows * splits; b += span.stride) {
    const int64_t row = kBlock ? b / splits : b;
    const int64_t begin = kBlock ? (b % splits) * slice : 0;
    const int64_t n = begin < a.classes ? (a.classes - begin < slice ? a.classes - begin : slice) : 0;
    const math::RowState<O> st =
        combine_group<Linear, kBlock>(fold_slice<Linear>(a, h, row, begin, n, span), span.lanes);
    if (span.lane == 0) {
      if (splits == 1) {
        finish_row_outputs(a, row, st);
      } else {
        O* out = a.partial + 4 * b;
        out[0] = st.max;
        out[1] = st.sum;
        out[2] = st.dot;
        out[3] = st.asum;
      }
    }
    if (kBlock) __syncthreads();  // block_combine's shared memory is written again for the next item
  }
}

// Split-vocabulary path, second step: one thread per row combines the row's slices.
template <class T, class O>
__global__ void cross_entropy_combine_splits_kernel(XentArgs<T, O> a) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    math::RowState<O> st = math::empty_row_state<O>();
    for (int s = 0; s < a.splits; ++s) {
      const O* p = a.partial + 4 * (row * a.splits + s);
      st = math::combine(st, math::RowState<O>{p[0], p[1], p[2], p[3]});
    }
    finish_row_outputs(a, row, st);
  }
}

// Backward slice of a row per block (kBlock): kThreads threads × 4 vectors of 16 bytes (fp32: 8192 logits);
// a group of lanes takes its whole row.
template <class T>
constexpr int64_t backward_block_slice() {
  return static_cast<int64_t>(kThreads) * kVectorsPerThread * Pack<T>::kSize;
}

// Item b: slice b % slices of row b / slices (slices = 1 for groups of lanes). No barrier: the lane that
// writes the target class's gradient is the lane that reads its logit, so the in-place backward is safe.
template <class T, class O, bool Linear, bool kBlock>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T, Linear>())
    cross_entropy_backward_kernel(XentArgs<T, O> a, int64_t block_slices, int lanes_log2) {
  const int64_t slices = kBlock ? block_slices : 1;
  const int64_t slice_length = kBlock ? backward_block_slice<T>() : a.classes;
  const math::XentHyper<O> h = xent_hyper(a);
  const GroupSpan span = group_span<kBlock>(lanes_log2);
  for (int64_t b = span.first; b < a.rows * slices; b += span.stride) {
    const int64_t row = kBlock ? b / slices : b;
    const O row_grad_loss = a.grad_loss[row * a.grad_loss_stride];
    if (a.keep_unit_rows && row_grad_loss == O(1)) continue;
    const int64_t begin = kBlock ? (b % slices) * slice_length : 0;
    const int64_t n = a.classes - begin < slice_length ? a.classes - begin : slice_length;
    const math::RowLse<O> lse{a.row_lse[2 * row], a.row_lse[2 * row + 1]};
    // In opmath before the one rounding (fp16 under loss scaling would underflow otherwise).
    const O scale = math::mean_scale(row_grad_loss, *a.denominator);
    const RowGradient<O> r =
        row_gradient(a, h, read_row_target(a, row), scale, lse, a.target_is_prob ? a.target_mass[row] : O(0));
    if (r.target.bad && span.lane == 0 && begin == 0) guard_nan_gradient(a.bad_target);  // its gradient is NaN
    write_slice_gradient<Linear>(a, h, row, begin, n, r, span);
  }
}

// The loss and its gradient for grad_loss = 1 in one pass of a group over each row: fold, combine, outputs,
// then the gradient, while the row is still in L2 (run_forward_backward_cuda sizes the groups for that), so
// that HBM sees one read and one write per logit instead of two reads and a write. Rows are not split: this
// runs where the forward would not split them. a.denominator is known before the launch (mean: the kept
// targets' weights, summed from index_row_weights_kernel's rows; else 1); a probability row's Σ w·t' is its own
// folded asum.
template <class T, class O, bool Linear, bool kBlock>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T, Linear>())
    cross_entropy_forward_backward_kernel(XentArgs<T, O> a, int lanes_log2) {
  const math::XentHyper<O> h = xent_hyper(a);
  if (blockIdx.x == 0 && threadIdx.x == 0) clear_consumed_step_guard(a.bad_target);
  const GroupSpan span = group_span<kBlock>(lanes_log2);
  const O scale = math::mean_scale(O(1), *a.denominator);
  for (int64_t row = span.first; row < a.rows; row += span.stride) {
    const math::RowState<O> mine = fold_slice<Linear>(a, h, row, 0, a.classes, span);
    // The target's logit, read before any thread of the group can write the gradient over it (in place). A
    // block's combine has a barrier; a warp's shuffles order no memory, so its lanes meet at __syncwarp first.
    const RowTarget target = read_row_target(a, row);
    const O target_logit = span.lane == 0 ? read_target_logit(a, row, target) : O(0);
    if (!kBlock) __syncwarp(group_mask(span.lanes));
    const math::RowState<O> st = combine_group<Linear, kBlock>(mine, span.lanes);
    if (span.lane == 0) write_row_outputs(a, row, st, target, target_logit);
    const RowGradient<O> r = row_gradient(a, h, target, scale, math::finish_row(st), st.asum);
    if (target.bad && span.lane == 0) guard_nan_gradient(a.bad_target);  // this row's gradient is NaN
    write_slice_gradient<Linear>(a, h, row, 0, a.classes, r, span);
    if (kBlock) __syncthreads();  // block_combine's shared memory is written again for the next row
  }
}

// The row weights of a mean over class-index targets (w_t for a kept target; 0 for an ignored or out-of-range
// one, whose report waits for the loss kernel), summed into the denominator before the fused kernel.
template <class T, class O>
__global__ void index_row_weights_kernel(XentArgs<T, O> a) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const RowTarget target = read_row_target(a, row);
    a.row_weight[row] = target.kept() ? (a.weight != nullptr ? a.weight[target.index] : O(1)) : O(0);
  }
}

// ---- The (batch, classes, positions) layout: a thread per row ----
// A segmentation loss's (N, C, d1, …, dK) logits, taken where they lie instead of copied into rows. Neighbouring
// threads take neighbouring positions, so each class's loads and stores are coalesced across a warp (fp32: 128
// bytes per class for 32 rows); a thread folds its row one element at a time (accumulate_run<Linear, 1>), and
// writes the gradient from a second read of its row, from L1/L2.
constexpr int kPositionThreads = 256;

// A thread's rows, grid-stride, each with the element of its class 0 (its classes follow at stride
// a.positions). The batch entry and position are carried from row to row: only the first row divides (a 64-bit
// division is a subroutine call on the GPU). a.positions > 0: the kernels run only for rows > 0.
template <class T, class O>
struct PositionRows {
  int64_t row, batch, position;
  int64_t stride, stride_batches, stride_positions;

  __device__ __forceinline__ explicit PositionRows(const XentArgs<T, O>& a)
      : row(blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x),
        batch(row / a.positions),
        position(row % a.positions),
        stride(static_cast<int64_t>(gridDim.x) * blockDim.x),
        stride_batches(stride / a.positions),
        stride_positions(stride % a.positions) {}
  __device__ __forceinline__ int64_t offset(const XentArgs<T, O>& a) const {
    return batch * a.classes * a.positions + position;
  }
  __device__ __forceinline__ void next(const XentArgs<T, O>& a) {
    row += stride;
    batch += stride_batches;
    position += stride_positions;
    if (position >= a.positions) {
      position -= a.positions;
      ++batch;
    }
  }
};

// The linear coefficient of class j of the row at offset (Linear kernels only): w_j, times t'_j for probabilities.
template <class T, class O>
__device__ __forceinline__ O position_linear_coef(const XentArgs<T, O>& a, const math::XentHyper<O>& h,
                                                  int64_t offset, int64_t j) {
  const O w = a.weight[j];
  if (!a.target_is_prob) return w;
  const T* t = static_cast<const T*>(a.target) + offset;
  return w * math::smoothed_target(static_cast<O>(t[j * a.positions]), h);
}

template <bool Linear, class T, class O>
__device__ __forceinline__ math::RowState<O> fold_position_row(const XentArgs<T, O>& a, const math::XentHyper<O>& h,
                                                               int64_t offset) {
  const T* x = a.logits + offset;
  math::RowState<O> st = math::empty_row_state<O>();
  for (int64_t j = 0; j < a.classes; ++j) {
    const O xj = static_cast<O>(x[j * a.positions]);
    const O aj = Linear ? position_linear_coef(a, h, offset, j) : O(0);
    math::accumulate_run<Linear, 1>(st, &xj, &aj);
  }
  return st;
}

// Writes the gradient of the row at offset; in place each element is read and then written by this thread.
template <bool Linear, class T, class O>
__device__ __forceinline__ void write_position_gradient(const XentArgs<T, O>& a, const math::XentHyper<O>& h,
                                                        int64_t offset, const RowGradient<O>& r) {
  const T* x = a.logits + offset;
  T* g = a.grad + offset;
  if (r.target.ignored || r.target.bad) {
    // 0 for an ignored row, NaN for a bad target; the logits are not read.
    const T fill = r.target.ignored ? T(0) : static_cast<T>(std::numeric_limits<O>::quiet_NaN());
    for (int64_t j = 0; j < a.classes; ++j) g[j * a.positions] = fill;
    return;
  }
  const math::RowGrad<O>& rg = r.rg;
  for (int64_t j = 0; j < a.classes; ++j) {
    const O aj = Linear ? position_linear_coef(a, h, offset, j) : O(0);
    const O gj =
        math::grad_element(static_cast<O>(x[j * a.positions]), aj, rg.shift, rg.log_sum, rg.softmax_coef,
                           rg.linear_coef);
    g[j * a.positions] = static_cast<T>(j == r.target.index ? gj - rg.target_coef : gj);  // -1 never matches
  }
}

// The forward (kGradient: and the gradient for grad_loss = 1, a.denominator known before the launch, as
// cross_entropy_forward_backward_kernel's) of each row, a thread per row.
template <class T, class O, bool Linear, bool kGradient>
__global__ void __launch_bounds__(kPositionThreads) cross_entropy_positions_forward_kernel(XentArgs<T, O> a) {
  const math::XentHyper<O> h = xent_hyper(a);
  if (blockIdx.x == 0 && threadIdx.x == 0) clear_consumed_step_guard(a.bad_target);
  const O scale = kGradient ? math::mean_scale(O(1), *a.denominator) : O(0);
  for (PositionRows<T, O> it(a); it.row < a.rows; it.next(a)) {
    const int64_t row = it.row, offset = it.offset(a);
    const math::RowState<O> st = fold_position_row<Linear>(a, h, offset);
    const RowTarget target = read_row_target(a, row);
    const O target_logit = target.kept() ? static_cast<O>(a.logits[offset + target.index * a.positions]) : O(0);
    write_row_outputs(a, row, st, target, target_logit);
    if (kGradient) {
      // A probability row's Σ w·t' is its folded asum.
      const RowGradient<O> r = row_gradient(a, h, target, scale, math::finish_row(st), st.asum);
      if (target.bad) guard_nan_gradient(a.bad_target);  // this row's gradient is NaN
      write_position_gradient<Linear>(a, h, offset, r);
    }
  }
}

template <class T, class O, bool Linear>
__global__ void __launch_bounds__(kPositionThreads) cross_entropy_positions_backward_kernel(XentArgs<T, O> a) {
  const math::XentHyper<O> h = xent_hyper(a);
  for (PositionRows<T, O> it(a); it.row < a.rows; it.next(a)) {
    const int64_t row = it.row;
    const O row_grad_loss = a.grad_loss[row * a.grad_loss_stride];
    if (a.keep_unit_rows && row_grad_loss == O(1)) continue;
    const int64_t offset = it.offset(a);
    const math::RowLse<O> lse{a.row_lse[2 * row], a.row_lse[2 * row + 1]};
    O target_mass = 0;  // Σ_c w_c·t'_c of a probability row: one more read of its targets
    if (Linear && a.target_is_prob) {
      for (int64_t j = 0; j < a.classes; ++j) target_mass += position_linear_coef(a, h, offset, j);
    }
    // In opmath before the one rounding (fp16 under loss scaling would underflow otherwise).
    const O scale = math::mean_scale(row_grad_loss, *a.denominator);
    const RowGradient<O> r = row_gradient(a, h, read_row_target(a, row), scale, lse, target_mass);
    if (r.target.bad) guard_nan_gradient(a.bad_target);  // its gradient is NaN
    write_position_gradient<Linear>(a, h, offset, r);
  }
}

unsigned position_grid(int64_t rows, int sms) {
  return grid_blocks((rows + kPositionThreads - 1) / kPositionThreads, sms);
}

template <class T, class O>
XentArgs<T, O> make_args(const CrossEntropyCall& c, int64_t ignore_index, double label_smoothing,
                         double lse_square_scale) {
  XentArgs<T, O> a{};
  a.logits = c.input.const_data_ptr<T>();
  a.logits_row_stride = c.input.stride(0);
  a.rows = c.rows;
  a.classes = c.classes;
  a.positions = c.spatial ? c.positions : 0;
  a.target = c.target.const_data_ptr();
  a.target_row_stride = c.target.stride(0);
  a.target_is_prob = c.target_is_prob;
  a.target_is_int32 = c.target.scalar_type() == at::kInt;
  a.weight = c.weight.defined() ? c.weight.const_data_ptr<O>() : nullptr;
  a.class_weight_sum = c.class_weight_sum.defined() ? c.class_weight_sum.const_data_ptr<O>() : nullptr;
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.lse_square_scale = lse_square_scale;
  a.bad_target = bad_target_report(c.input.get_device());
  a.splits = 1;
  return a;
}

// The per-row outputs of the forward kernels, in opmath.
struct LossRows {
  at::Tensor lse;  // (rows, 2): shift, log_sum
  at::Tensor loss, z_loss, weight;
};

LossRows empty_loss_rows(const CrossEntropyCall& c) {
  const auto opts = c.input.options().dtype(c.opmath);
  return {at::empty({c.rows, 2}, opts), at::empty({c.rows}, opts), at::empty({c.rows}, opts),
          at::empty({c.rows}, opts)};
}

template <class T, class O>
void set_loss_rows(XentArgs<T, O>& a, const LossRows& rows) {
  a.row_lse = rows.lse.data_ptr<O>();
  a.row_loss = rows.loss.data_ptr<O>();
  a.row_z_loss = rows.z_loss.data_ptr<O>();
  a.row_weight = rows.weight.data_ptr<O>();
}

// A mean's denominator: the rows for probabilities, else the kept targets' weights summed (ATen, on the
// stream: no host synchronisation).
at::Tensor mean_denominator(const CrossEntropyCall& c, const at::Tensor& row_weight) {
  return c.target_is_prob ? at::full({}, static_cast<double>(c.rows), row_weight.options()) : row_weight.sum();
}

// The op's outputs from the rows: loss and z-loss reduced as asked (in opmath_loss's dtype), the rows'
// (shift, log_sum), and the denominator (a mean's; 1 otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduce_loss(const CrossEntropyCall& c,
                                                                       const LossRows& rows,
                                                                       const at::Tensor& denominator,
                                                                       bool opmath_loss) {
  const auto dtype = opmath_loss ? c.opmath : c.input.scalar_type();
  if (c.reduction == XentReduction::None) return {rows.loss.to(dtype), rows.z_loss.to(dtype), rows.lse, denominator};
  if (c.reduction == XentReduction::Sum) {
    return {rows.loss.sum().to(dtype), rows.z_loss.sum().to(dtype), rows.lse, denominator};
  }
  return {mean_over(rows.loss.sum(), denominator).to(dtype), mean_over(rows.z_loss.sum(), denominator).to(dtype),
          rows.lse, denominator};
}

// Vocabulary slices per row in the forward: more than one when the rows alone leave SMs idle (aim for two
// blocks per SM, each slice still at least 4 vectors per thread). Rows small enough for a group of lanes are
// never split.
int64_t forward_splits(const CrossEntropyCall& c, const RowGroups& groups, int sms, int64_t pack_size) {
  if (!groups.block || c.rows >= 2 * sms) return 1;
  const int64_t min_slice = static_cast<int64_t>(kThreads) * 4 * pack_size;
  const int64_t splits = std::min<int64_t>((2 * sms + c.rows - 1) / c.rows, (c.classes + min_slice - 1) / min_slice);
  return std::max<int64_t>(1, splits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_forward_cuda(const CrossEntropyCall& c,
                                                                            int64_t ignore_index,
                                                                            double label_smoothing,
                                                                            double lse_square_scale,
                                                                            bool opmath_loss) {
  const LossRows rows = empty_loss_rows(c);
  if (c.rows > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int sms = sm_count(c.input.get_device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.input.scalar_type(), "cross_entropy_forward_cuda", [&] {
      using O = Opmath<scalar_t>;
      XentArgs<scalar_t, O> a = make_args<scalar_t, O>(c, ignore_index, label_smoothing, lse_square_scale);
      set_loss_rows(a, rows);
      if (c.spatial) {
        with_linear(c, label_smoothing, [&](auto linear) {
          cross_entropy_positions_forward_kernel<scalar_t, O, decltype(linear)::value, false>
              <<<position_grid(c.rows, sms), kPositionThreads, 0, stream>>>(a);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const RowGroups groups = row_groups(c.rows, c.classes, sms);
      const int64_t splits = forward_splits(c, groups, sms, Pack<scalar_t>::kSize);
      at::Tensor partial;
      if (splits > 1) {
        partial = at::empty({c.rows, splits, 4}, rows.loss.options());
        a.partial = partial.data_ptr<O>();
      }
      a.splits = static_cast<int>(splits);
      const unsigned blocks = group_grid(groups, c.rows * splits, sms);
      with_kernel_kind(c, label_smoothing, groups, [&](auto linear, auto block) {
        cross_entropy_forward_kernel<scalar_t, O, decltype(linear)::value, decltype(block)::value>
            <<<blocks, kThreads, 0, stream>>>(a, groups.lanes_log2);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (splits > 1) {
        constexpr int kCombineThreads = 128;
        cross_entropy_combine_splits_kernel<scalar_t, O>
            <<<grid_blocks((c.rows + kCombineThreads - 1) / kCombineThreads, sms), kCombineThreads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  const at::Tensor denominator = c.reduction == XentReduction::Mean
                                     ? mean_denominator(c, rows.weight)
                                     : at::ones({}, rows.loss.options());
  return reduce_loss(c, rows, denominator, opmath_loss);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, bool opmath_loss) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  raise_if_bad_target_seen("cross_entropy_forward", input.get_device());
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, false);
  return run_forward_cuda(c, ignore_index, label_smoothing, lse_square_scale, opmath_loss);
}

// g: grad_loss in opmath (check_cross_entropy_backward). keep_unit_rows: see XentArgs.
void run_backward_cuda(const CrossEntropyCall& c, const at::Tensor& g, const at::Tensor& row_lse,
                       const at::Tensor& denominator, int64_t ignore_index, double label_smoothing,
                       double lse_square_scale, const at::Tensor& grad, int64_t grad_row_stride,
                       bool keep_unit_rows = false) {
  if (c.rows == 0) return;
  at::Tensor target_mass;
  if (c.target_is_prob && !c.spatial) {  // the layout's kernel sums its rows' targets itself
    // A_r = Σ_c w_c·((1-ε)·t_c + ε/C) = (1-ε)·(t·w)_r + (ε/C)·Σw: one matrix-vector product. In opmath even
    // under autocast, whose CUDA list casts mv to half (the op has no autocast kernel of its own, so the
    // autocast keys are still live in here).
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    target_mass = at::mv(c.target.to(c.opmath), c.weight) * (1.0 - label_smoothing) +
                  c.weight.sum() * (label_smoothing / static_cast<double>(c.classes));
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.input.scalar_type(), "cross_entropy_backward_cuda", [&] {
    using O = Opmath<scalar_t>;
    XentArgs<scalar_t, O> a = make_args<scalar_t, O>(c, ignore_index, label_smoothing, lse_square_scale);
    a.row_lse = const_cast<O*>(row_lse.const_data_ptr<O>());
    a.grad = static_cast<scalar_t*>(grad.data_ptr());
    a.grad_row_stride = grad_row_stride;
    a.grad_loss = g.const_data_ptr<O>();
    a.keep_unit_rows = keep_unit_rows;
    a.grad_loss_stride = c.reduction == XentReduction::None ? g.stride(0) : 0;
    a.denominator = denominator.const_data_ptr<O>();
    a.target_mass = target_mass.defined() ? target_mass.const_data_ptr<O>() : nullptr;
    const int sms = sm_count(c.input.get_device());
    if (c.spatial) {
      with_linear(c, label_smoothing, [&](auto linear) {
        cross_entropy_positions_backward_kernel<scalar_t, O, decltype(linear)::value>
            <<<position_grid(c.rows, sms), kPositionThreads, 0, stream>>>(a);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const RowGroups groups = row_groups(c.rows, c.classes, sms);
    const int64_t slice = backward_block_slice<scalar_t>();
    const int64_t slices = groups.block ? (c.classes + slice - 1) / slice : 1;
    const unsigned blocks = group_grid(groups, c.rows * slices, sms);
    with_kernel_kind(c, label_smoothing, groups, [&](auto linear, auto block) {
      cross_entropy_backward_kernel<scalar_t, O, decltype(linear)::value, decltype(block)::value>
          <<<blocks, kThreads, 0, stream>>>(a, slices, groups.lanes_log2);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& row_lse,
                                       const at::Tensor& denominator, int64_t reduction, int64_t ignore_index,
                                       double label_smoothing, double lse_square_scale) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  raise_if_bad_target_seen("cross_entropy_backward", input.get_device());
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_backward", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, false);
  const at::Tensor g = check_cross_entropy_backward("cross_entropy_backward", c, grad_loss, row_lse, denominator);
  at::Tensor grad = at::empty(c.input.sizes(), input.options());
  run_backward_cuda(c, g, row_lse, denominator, ignore_index, label_smoothing, lse_square_scale, grad, c.classes);
  return grad;
}

void cross_entropy_backward_inplace_cuda(const at::Tensor& grad_loss, const at::Tensor& input,
                                         const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                         const at::Tensor& row_lse, const at::Tensor& denominator, int64_t reduction,
                                         int64_t ignore_index, double label_smoothing, double lse_square_scale) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  raise_if_bad_target_seen("cross_entropy_backward_", input.get_device());
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_backward_", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, true);
  const at::Tensor g = check_cross_entropy_backward("cross_entropy_backward_", c, grad_loss, row_lse, denominator);
  run_backward_cuda(c, g, row_lse, denominator, ignore_index, label_smoothing, lse_square_scale, input,
                    input.stride(0));
}

at::Tensor ones_like_grad_loss(const CrossEntropyCall& c) {
  const auto opts = c.input.options().dtype(c.opmath);
  return c.reduction == XentReduction::None ? at::ones({c.rows}, opts) : at::ones({}, opts);
}

// The forward that also writes the gradient for grad_loss = 1 into grad (row stride grad_row_stride; grad may
// be the logits). One kernel (cross_entropy_forward_backward_kernel) wherever the forward would not split the
// vocabulary; with few long rows, the split forward and the backward kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_forward_backward_cuda(
    const CrossEntropyCall& c, int64_t ignore_index, double label_smoothing, double lse_square_scale,
    bool opmath_loss, const at::Tensor& grad, int64_t grad_row_stride) {
  const int sms = c.rows > 0 ? sm_count(c.input.get_device()) : 0;
  // The second read of a row should hit L2. A warp per row keeps 32 rows per SM in flight (two blocks of 16
  // warps), a block per row 2: rows of up to 8 KiB go to warps (32 · 8 KiB · 132 SMs = 33 MiB), longer ones to
  // blocks (a row of 32000 fp32, 128 KiB: 2 · 128 KiB · 132 = 33 MiB; an H100's L2 is 50 MiB). Rows of 128K
  // classes do not fit (67 MiB in bf16): their second read goes to HBM, as with two kernels.
  const RowGroups groups = row_groups(c.rows, c.classes, sms, kFusedWarpRowBytes / c.input.element_size());
  if (c.rows == 0 || (!c.spatial && forward_splits(c, groups, sms, 16 / c.input.element_size()) > 1)) {
    auto out = run_forward_cuda(c, ignore_index, label_smoothing, lse_square_scale, opmath_loss);
    run_backward_cuda(c, ones_like_grad_loss(c), std::get<2>(out), std::get<3>(out), ignore_index, label_smoothing,
                      lse_square_scale, grad, grad_row_stride);
    return out;
  }
  const LossRows rows = empty_loss_rows(c);
  at::Tensor denominator;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, c.input.scalar_type(), "cross_entropy_forward_backward_cuda", [&] {
    using O = Opmath<scalar_t>;
    XentArgs<scalar_t, O> a = make_args<scalar_t, O>(c, ignore_index, label_smoothing, lse_square_scale);
    set_loss_rows(a, rows);
    a.grad = static_cast<scalar_t*>(grad.data_ptr());
    a.grad_row_stride = grad_row_stride;
    if (c.reduction == XentReduction::Mean) {
      if (!c.target_is_prob) {
        constexpr int kWeightThreads = 256;
        index_row_weights_kernel<scalar_t, O>
            <<<grid_blocks((c.rows + kWeightThreads - 1) / kWeightThreads, sms), kWeightThreads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      denominator = mean_denominator(c, rows.weight);
    } else {
      denominator = at::ones({}, rows.loss.options());
    }
    a.denominator = denominator.const_data_ptr<O>();
    if (c.spatial) {
      with_linear(c, label_smoothing, [&](auto linear) {
        cross_entropy_positions_forward_kernel<scalar_t, O, decltype(linear)::value, true>
            <<<position_grid(c.rows, sms), kPositionThreads, 0, stream>>>(a);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const unsigned blocks = group_grid(groups, c.rows, sms);
    with_kernel_kind(c, label_smoothing, groups, [&](auto linear, auto block) {
      cross_entropy_forward_backward_kernel<scalar_t, O, decltype(linear)::value, decltype(block)::value>
          <<<blocks, kThreads, 0, stream>>>(a, groups.lanes_log2);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return reduce_loss(c, rows, denominator, opmath_loss);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, bool opmath_loss) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  raise_if_bad_target_seen("cross_entropy_forward_backward", input.get_device());
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward_backward", input, target, weight,
                                                      reduction, label_smoothing, lse_square_scale, false);
  at::Tensor grad = at::empty(c.input.sizes(), input.options());
  auto [loss, z_loss, row_lse, denominator] =
      run_forward_backward_cuda(c, ignore_index, label_smoothing, lse_square_scale, opmath_loss, grad, c.classes);
  return {loss, z_loss, row_lse, denominator, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward_inplace_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, bool opmath_loss) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  raise_if_bad_target_seen("cross_entropy_forward_backward_", input.get_device());
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward_backward_", input, target, weight,
                                                      reduction, label_smoothing, lse_square_scale, true);
  return run_forward_backward_cuda(c, ignore_index, label_smoothing, lse_square_scale, opmath_loss, input,
                                   input.stride(0));
}

// Never known without reading grad_loss on the host (a sync): apply_grad_loss_ decides on the device.
bool cross_entropy_grad_loss_is_one_cuda(const at::Tensor& /*grad_loss*/) { return false; }

// Makes the forward's gradient (for grad_loss = 1) the gradient for grad_loss without reading grad_loss on
// the host: the backward kernel runs over every row, and a row whose grad_loss is exactly 1 (every row, for
// loss.backward()) returns at once; the others are recomputed from the logits with grad_loss applied in
// opmath before the one rounding (as cpu/cross_entropy.cpp explains).
void cross_entropy_apply_grad_loss_inplace_cuda(const at::Tensor& grad_input, const at::Tensor& grad_loss,
                                                const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& row_lse,
                                                const at::Tensor& denominator, int64_t reduction,
                                                int64_t ignore_index, double label_smoothing,
                                                double lse_square_scale) {
  const char* op = "cross_entropy_apply_grad_loss_";
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  raise_if_bad_target_seen(op, input.get_device());
  const CrossEntropyCall c =
      check_cross_entropy_call(op, input, target, weight, reduction, label_smoothing, lse_square_scale, false);
  check_cross_entropy_grad_input(op, c, grad_input);
  const at::Tensor g = check_cross_entropy_backward(op, c, grad_loss, row_lse, denominator);
  run_backward_cuda(c, g, row_lse, denominator, ignore_index, label_smoothing, lse_square_scale, grad_input,
                    grad_input.stride(0), true);
}

// grad_input *= grad_loss, on the stream, without reading grad_loss on the host. The scale is opmath and has
// grad_input's number of dims (one element: all of size 1), so the multiply runs in opmath (a 0-dim tensor would
// be cast to grad_input's dtype first, and GradScaler's 2^16 is inf in fp16).
void cross_entropy_scale_grad_inplace_cuda(const at::Tensor& grad_input, const at::Tensor& grad_loss) {
  const c10::cuda::OptionalCUDAGuard guard(grad_input.device());
  raise_if_bad_target_seen("cross_entropy_scale_grad_", grad_input.get_device());
  const at::Tensor scale = check_cross_entropy_scale_grad("cross_entropy_scale_grad_", grad_input, grad_loss);
  grad_input.mul_(scale.dim() == 0 ? scale.reshape(std::vector<int64_t>(grad_input.dim(), 1)) : scale);
}

}  // namespace
}  // namespace cuda
}  // namespace fused_train

TORCH_LIBRARY_IMPL(fused_train, CUDA, m) {
  m.impl("cross_entropy_forward", &fused_train::cuda::cross_entropy_forward_cuda);
  m.impl("cross_entropy_backward", &fused_train::cuda::cross_entropy_backward_cuda);
  m.impl("cross_entropy_backward_", &fused_train::cuda::cross_entropy_backward_inplace_cuda);
  m.impl("cross_entropy_forward_backward", &fused_train::cuda::cross_entropy_forward_backward_cuda);
  m.impl("cross_entropy_forward_backward_", &fused_train::cuda::cross_entropy_forward_backward_inplace_cuda);
  m.impl("cross_entropy_grad_loss_is_one", &fused_train::cuda::cross_entropy_grad_loss_is_one_cuda);
  m.impl("cross_entropy_apply_grad_loss_", &fused_train::cuda::cross_entropy_apply_grad_loss_inplace_cuda);
  m.impl("cross_entropy_scale_grad_", &fused_train::cuda::cross_entropy_scale_grad_inplace_cuda);
}
