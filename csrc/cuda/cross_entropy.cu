// CUDA implementations of the cross-entropy ops. The math is fused_train/xent_math.h (the CPU kernels run
// the same functions); this file spreads rows over blocks.
//
// Forward: one block per row (or per slice of a row when there are too few rows to fill the GPU: the
// split-vocabulary path, whose partial states a second small kernel combines). Each thread folds its
// elements into a math::RowState with one exp per logit, reading 16-byte vectors once the row pointer is
// aligned; the block combines the states with warp shuffles. Backward: a flat grid of (row, slice)
// blocks, each recomputing its row's constants from the saved (shift, log_sum), then one read of the
// logits and one write of the gradient per element.
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

#include "cross_entropy_args.h"
#include "cuda/bad_target.cuh"
#include "fused_train/xent_math.h"

namespace fused_train {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Backward slice of a row per block: kThreads threads × 4 vectors of 16 bytes (fp32: 8192 logits).
constexpr int kVectorsPerThread = 4;
// Both kernels stride over their work items with at most this many blocks per SM, so the grid never nears
// gridDim.x's 2^31 - 1, however many rows. 24 is a whole number of waves for 1, 2, 3 or 4 resident blocks
// per SM (ptxas, sm_90: forward fp32/bf16 3, fp16 4, fp64 and backward 2): equal work per block leaves no
// partial last wave.
constexpr int64_t kBlocksPerSm = 24;

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

// 16 bytes of T.
template <class T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Elements before p reaches 16-byte alignment (p is always aligned to sizeof(T)).
template <class T>
__device__ __forceinline__ int64_t unaligned_head(const T* p, int64_t n) {
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
  const int64_t head = misalign == 0 ? 0 : (16 - misalign) / static_cast<int64_t>(sizeof(T));
  return head < n ? head : n;
}

// Calls f(j) for every j in [0, n) of a row slice starting at p, each thread its share, reading 16-byte
// vectors in the aligned middle: f(j, x) gets the logit as opmath.
template <class T, class O, class F>
__device__ __forceinline__ void for_each_logit(const T* p, int64_t n, F&& f) {
  const int64_t head = unaligned_head(p, n);
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) f(j, static_cast<O>(p[j]));
  const int64_t vectors = (n - head) / Pack<T>::kSize;
  const Pack<T>* body = reinterpret_cast<const Pack<T>*>(p + head);
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    const Pack<T> pack = body[v];
#pragma unroll
    for (int k = 0; k < Pack<T>::kSize; ++k) f(head + v * Pack<T>::kSize + k, static_cast<O>(pack.v[k]));
  }
  for (int64_t j = head + vectors * Pack<T>::kSize + threadIdx.x; j < n; j += blockDim.x) f(j, static_cast<O>(p[j]));
}

template <class O>
__device__ __forceinline__ math::RowState<O> shuffle_down(const math::RowState<O>& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.max, offset), __shfl_down_sync(0xffffffffu, s.sum, offset),
          __shfl_down_sync(0xffffffffu, s.dot, offset), __shfl_down_sync(0xffffffffu, s.asum, offset)};
}

// Combines every thread's state; the result is valid in thread 0.
template <class O>
__device__ math::RowState<O> block_combine(math::RowState<O> st) {
  __shared__ O shared[4][kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) st = math::combine(st, shuffle_down(st, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared[0][warp] = st.max;
    shared[1][warp] = st.sum;
    shared[2][warp] = st.dot;
    shared[3][warp] = st.asum;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? math::RowState<O>{shared[0][lane], shared[1][lane], shared[2][lane], shared[3][lane]}
                       : math::empty_row_state<O>();
    for (int offset = 16; offset > 0; offset >>= 1) st = math::combine(st, shuffle_down(st, offset));
  }
  return st;
}

// Turns a row's combined state into its outputs (one thread per row).
template <class T, class O>
__device__ void write_row_outputs(const XentArgs<T, O>& a, int64_t row, const math::RowState<O>& st) {
  const math::XentHyper<O> h = xent_hyper(a);
  const math::RowLse<O> lse = math::finish_row(st);
  O loss = 0, row_weight = 0;
  bool ignored = false;
  if (a.target_is_prob) {
    loss = math::prob_row_loss(st, lse, h);
    row_weight = 1;
  } else {
    const int64_t t = read_index(a, row);
    ignored = t == a.ignore_index;
    if (!ignored && (t < 0 || t >= a.classes)) {
      report_bad_target(a.bad_target, row, t);
      loss = std::numeric_limits<O>::quiet_NaN();
    } else if (!ignored) {
      row_weight = a.weight != nullptr ? a.weight[t] : O(1);
      loss = math::index_row_loss(st, lse, static_cast<O>(a.logits[row * a.logits_row_stride + t]), row_weight, h);
    }
  }
  a.row_lse[2 * row] = lse.shift;
  a.row_lse[2 * row + 1] = lse.log_sum;
  a.row_loss[row] = loss;
  a.row_z_loss[row] = ignored ? O(0) : math::z_loss(lse, h);
  a.row_weight[row] = row_weight;
}

// Work item b = (row b / splits, split b % splits): a block folds that slice of the row, and with one split
// finishes the row itself. Blocks stride over the items (a grid of at most grid_blocks()).
template <class T, class O>
__global__ void __launch_bounds__(kThreads) cross_entropy_forward_kernel(XentArgs<T, O> a) {
  const math::XentHyper<O> h = xent_hyper(a);
  const bool linear = a.target_is_prob || h.smoothing;
  const int64_t slice = (a.classes + a.splits - 1) / a.splits;
  if (blockIdx.x == 0 && threadIdx.x == 0) clear_consumed_step_guard(a.bad_target);
  for (int64_t b = blockIdx.x; b < a.rows * a.splits; b += gridDim.x) {
    const int64_t row = b / a.splits;
    const int64_t begin = (b % a.splits) * slice;
    const int64_t n = begin < a.classes ? (a.classes - begin < slice ? a.classes - begin : slice) : 0;
    const T* target_row =
        a.target_is_prob ? static_cast<const T*>(a.target) + row * a.target_row_stride + begin : nullptr;
    const O* weight = a.weight != nullptr ? a.weight + begin : nullptr;
    math::RowState<O> st = math::empty_row_state<O>();
    for_each_logit<T, O>(a.logits + row * a.logits_row_stride + begin, n, [&](int64_t j, O x) {
      O coef = 0;
      if (linear) {
        coef = weight[j];
        if (target_row != nullptr) coef *= math::smoothed_target(static_cast<O>(target_row[j]), h);
      }
      math::accumulate(st, x, coef, linear);
    });
    st = block_combine(st);
    if (threadIdx.x == 0) {
      if (a.splits == 1) {
        write_row_outputs(a, row, st);
      } else {
        O* out = a.partial + 4 * b;
        out[0] = st.max;
        out[1] = st.sum;
        out[2] = st.dot;
        out[3] = st.asum;
      }
    }
    __syncthreads();  // block_combine's shared memory is written again for the next item
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
    write_row_outputs(a, row, st);
  }
}

// Block b handles slice b % slices of row b / slices.
template <class T, class O>
__global__ void __launch_bounds__(kThreads) cross_entropy_backward_kernel(XentArgs<T, O> a, int64_t slices) {
  constexpr int64_t kSlice = static_cast<int64_t>(kThreads) * kVectorsPerThread * Pack<T>::kSize;
  const math::XentHyper<O> h = xent_hyper(a);
  for (int64_t b = blockIdx.x; b < a.rows * slices; b += gridDim.x) {
    const int64_t row = b / slices;
    const O row_grad_loss = a.grad_loss[row * a.grad_loss_stride];
    // The same value for the whole block: it skips the item together, before any barrier.
    if (a.keep_unit_rows && row_grad_loss == O(1)) continue;
    const int64_t begin = (b % slices) * kSlice;
    const int64_t n = a.classes - begin < kSlice ? a.classes - begin : kSlice;
    const T* x = a.logits + row * a.logits_row_stride + begin;
    T* g = a.grad + row * a.grad_row_stride + begin;
    const math::RowLse<O> lse{a.row_lse[2 * row], a.row_lse[2 * row + 1]};
    // In opmath before the one rounding (fp16 under loss scaling would underflow otherwise).
    const O scale = math::mean_scale(row_grad_loss, *a.denominator);
    int64_t t = -1;
    bool ignored = false, bad = false;
    math::RowGrad<O> rg;
    if (a.target_is_prob) {
      rg = math::prob_row_grad(scale, lse, a.target_mass[row], h);
    } else {
      t = read_index(a, row);
      ignored = t == a.ignore_index;
      bad = !ignored && (t < 0 || t >= a.classes);
      rg = math::index_row_grad(scale, lse, ignored || bad || a.weight == nullptr ? O(1) : a.weight[t], h);
    }
    if (bad && threadIdx.x == 0 && begin == 0) guard_nan_gradient(a.bad_target);  // this row's gradient is NaN
    const bool owns_target = !ignored && !bad && t >= begin && t < begin + n;
    // Read before this block overwrites it (the in-place backward writes over the logits).
    const O x_t = owns_target ? static_cast<O>(x[t - begin]) : O(0);
    __syncthreads();
    const bool linear = a.target_is_prob || h.smoothing;
    const T* target_row =
        a.target_is_prob ? static_cast<const T*>(a.target) + row * a.target_row_stride + begin : nullptr;
    const O* weight = a.weight != nullptr ? a.weight + begin : nullptr;
    const auto element = [&](int64_t j, O xj) -> T {
      if (ignored) return T(0);
      if (bad) return static_cast<T>(std::numeric_limits<O>::quiet_NaN());
      O coef = 0;
      if (linear) {
        coef = weight[j];
        if (target_row != nullptr) coef *= math::smoothed_target(static_cast<O>(target_row[j]), h);
      }
      return static_cast<T>(math::grad_element(xj, coef, rg.shift, rg.log_sum, rg.softmax_coef, rg.linear_coef));
    };
    // Vector stores need the gradient row to share the logits' alignment (always so in place, and for
    // the usual dense layouts); otherwise elements go one by one.
    const bool same_alignment = reinterpret_cast<uintptr_t>(x) % 16 == reinterpret_cast<uintptr_t>(g) % 16;
    if (same_alignment) {
      const int64_t head = unaligned_head(x, n);
      for (int64_t j = threadIdx.x; j < head; j += blockDim.x) g[j] = element(j, static_cast<O>(x[j]));
      const int64_t vectors = (n - head) / Pack<T>::kSize;
      const Pack<T>* xv = reinterpret_cast<const Pack<T>*>(x + head);
      Pack<T>* gv = reinterpret_cast<Pack<T>*>(g + head);
      for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
        const Pack<T> in = xv[v];
        Pack<T> out;
#pragma unroll
        for (int k = 0; k < Pack<T>::kSize; ++k) out.v[k] = element(head + v * Pack<T>::kSize + k, static_cast<O>(in.v[k]));
        gv[v] = out;
      }
      for (int64_t j = head + vectors * Pack<T>::kSize + threadIdx.x; j < n; j += blockDim.x) {
        g[j] = element(j, static_cast<O>(x[j]));
      }
    } else {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) g[j] = element(j, static_cast<O>(x[j]));
    }
    __syncthreads();
    if (owns_target && threadIdx.x == 0) {
      const O a_t = linear ? weight[t - begin] : O(0);
      g[t - begin] = static_cast<T>(math::target_grad(x_t, a_t, rg));
    }
  }
}

template <class T, class O>
XentArgs<T, O> make_args(const CrossEntropyCall& c, int64_t ignore_index, double label_smoothing,
                         double lse_square_scale) {
  XentArgs<T, O> a{};
  a.logits = c.input.const_data_ptr<T>();
  a.logits_row_stride = c.input.stride(0);
  a.rows = c.rows;
  a.classes = c.classes;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, bool opmath_loss) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  raise_if_bad_target_seen("cross_entropy_forward", input.get_device());
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, false);
  const auto opts = input.options().dtype(c.opmath);
  at::Tensor row_lse = at::empty({c.rows, 2}, opts);
  at::Tensor row_loss = at::empty({c.rows}, opts);
  at::Tensor row_z_loss = at::empty({c.rows}, opts);
  at::Tensor row_weight = at::empty({c.rows}, opts);
  if (c.rows > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int sms = sm_count(input.get_device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_forward_cuda", [&] {
      using O = Opmath<scalar_t>;
      XentArgs<scalar_t, O> a = make_args<scalar_t, O>(c, ignore_index, label_smoothing, lse_square_scale);
      a.row_lse = row_lse.data_ptr<O>();
      a.row_loss = row_loss.data_ptr<O>();
      a.row_z_loss = row_z_loss.data_ptr<O>();
      a.row_weight = row_weight.data_ptr<O>();
      // Split the vocabulary when the rows alone leave SMs idle: aim for two blocks per SM, each slice
      // still at least 4 vectors per thread.
      const int64_t min_slice = static_cast<int64_t>(kThreads) * 4 * Pack<scalar_t>::kSize;
      int64_t splits = 1;
      if (c.rows < 2 * sms) {
        splits = std::min<int64_t>((2 * sms + c.rows - 1) / c.rows, (c.classes + min_slice - 1) / min_slice);
        splits = std::max<int64_t>(splits, 1);
      }
      at::Tensor partial;
      if (splits > 1) {
        partial = at::empty({c.rows, splits, 4}, opts);
        a.partial = partial.data_ptr<O>();
      }
      a.splits = static_cast<int>(splits);
      cross_entropy_forward_kernel<scalar_t, O><<<grid_blocks(c.rows * splits, sms), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (splits > 1) {
        constexpr int kCombineThreads = 128;
        cross_entropy_combine_splits_kernel<scalar_t, O>
            <<<grid_blocks((c.rows + kCombineThreads - 1) / kCombineThreads, sms), kCombineThreads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  const auto dtype = opmath_loss ? c.opmath : input.scalar_type();
  if (c.reduction == XentReduction::None) {
    return {row_loss.to(dtype), row_z_loss.to(dtype), row_lse, at::ones({}, opts)};
  }
  // Reductions with ATen's kernels on the current stream; no host synchronisation.
  if (c.reduction == XentReduction::Sum) {
    return {row_loss.sum().to(dtype), row_z_loss.sum().to(dtype), row_lse, at::ones({}, opts)};
  }
  const at::Tensor denominator =
      c.target_is_prob ? at::full({}, static_cast<double>(c.rows), opts) : row_weight.sum();
  return {mean_over(row_loss.sum(), denominator).to(dtype), mean_over(row_z_loss.sum(), denominator).to(dtype), row_lse,
          denominator};
}

// g: grad_loss in opmath (check_cross_entropy_backward). keep_unit_rows: see XentArgs.
void run_backward_cuda(const CrossEntropyCall& c, const at::Tensor& g, const at::Tensor& row_lse,
                       const at::Tensor& denominator, int64_t ignore_index, double label_smoothing,
                       double lse_square_scale, const at::Tensor& grad, int64_t grad_row_stride,
                       bool keep_unit_rows = false) {
  if (c.rows == 0) return;
  at::Tensor target_mass;
  if (c.target_is_prob) {
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
    constexpr int64_t kSlice = static_cast<int64_t>(kThreads) * kVectorsPerThread * Pack<scalar_t>::kSize;
    const int64_t slices = (c.classes + kSlice - 1) / kSlice;
    cross_entropy_backward_kernel<scalar_t, O>
        <<<grid_blocks(c.rows * slices, sm_count(c.input.get_device())), kThreads, 0, stream>>>(a, slices);
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
  at::Tensor grad = at::empty({c.rows, c.classes}, input.options());
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

// The forward that also returns the gradient for grad_loss = 1. On CUDA this is still the two kernels of the
// forward and the backward (a single-pass version, gradient written while the row is in shared memory or
// registers, is future work that needs a GPU to tune); the saving here is the autograd round trip.
at::Tensor ones_like_grad_loss(const CrossEntropyCall& c) {
  const auto opts = c.input.options().dtype(c.opmath);
  return c.reduction == XentReduction::None ? at::ones({c.rows}, opts) : at::ones({}, opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, bool opmath_loss) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  auto [loss, z_loss, row_lse, denominator] = cross_entropy_forward_cuda(
      input, target, weight, reduction, ignore_index, label_smoothing, lse_square_scale, opmath_loss);
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward_backward", input, target, weight,
                                                      reduction, label_smoothing, lse_square_scale, false);
  at::Tensor grad = at::empty({c.rows, c.classes}, input.options());
  run_backward_cuda(c, ones_like_grad_loss(c), row_lse, denominator, ignore_index, label_smoothing, lse_square_scale,
                    grad, c.classes);
  return {loss, z_loss, row_lse, denominator, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward_inplace_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, bool opmath_loss) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward_backward_", input, target, weight,
                                                      reduction, label_smoothing, lse_square_scale, true);
  auto [loss, z_loss, row_lse, denominator] = cross_entropy_forward_cuda(
      input, target, weight, reduction, ignore_index, label_smoothing, lse_square_scale, opmath_loss);
  run_backward_cuda(c, ones_like_grad_loss(c), row_lse, denominator, ignore_index, label_smoothing, lse_square_scale,
                    input, input.stride(0));
  return {loss, z_loss, row_lse, denominator};
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

// grad_input *= grad_loss, on the stream, without reading grad_loss on the host. The scale is opmath and
// shaped (1, 1) or (rows, 1) so the multiply runs in opmath (a 0-dim tensor would be cast to grad_input's
// dtype first, and GradScaler's 2^16 is inf in fp16).
void cross_entropy_scale_grad_inplace_cuda(const at::Tensor& grad_input, const at::Tensor& grad_loss) {
  const c10::cuda::OptionalCUDAGuard guard(grad_input.device());
  raise_if_bad_target_seen("cross_entropy_scale_grad_", grad_input.get_device());
  const at::Tensor scale = check_cross_entropy_scale_grad("cross_entropy_scale_grad_", grad_input, grad_loss);
  grad_input.mul_(scale.dim() == 0 ? scale.reshape({1, 1}) : scale.unsqueeze(1));
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
