// The multi-tensor functors of the fused optimizers (SgdFunctor, AdamFunctor, RmspropFunctor, and
// Blockwise8bitFunctor for 8-bit state): how one block walks its chunk. The per-element math is
// optim_math.h's, the same code the CPU kernels run.
//
// Every chunk is walked with 16-byte loads and stores (4 fp32, 8 bf16/fp16, 2 fp64 elements per access;
// the fp32 state of a bf16/fp16 param takes two) and a scalar tail, when all of the chunk's addresses are
// 16-byte aligned; otherwise element by element. Values are widened to opmath (float, or double for fp64)
// once, updated, and the param rounded once on store.
//
// Everything here is __host__ __device__ and takes (thread, thread count) as arguments, so it can run on
// the CPU too.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cuda/bad_target.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "fused_train/optim_math.h"
#include "fused_train/quant_math.h"
#include "fused_train/stochastic_round.h"

// #pragma unroll for the device pass only: the host compiler does not know it (-Wunknown-pragmas).
#if defined(__CUDA_ARCH__)
#define FT_UNROLL _Pragma("unroll")
#else
#define FT_UNROLL
#endif

namespace fused_train {
namespace cuda {

template <class T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A one-element tensor argument (lr, grad_scale, found_inf): a device pointer read inside the kernel, so
// the host never waits for the GPU, or (ptr == nullptr) a value known on the host.
struct ScalarArg {
  const void* ptr;
  double value;
  bool is_double;  // *ptr is a double, else a float
  FT_HOST_DEVICE FT_INLINE double load() const {
    if (ptr == nullptr) return value;
    return is_double ? *static_cast<const double*>(ptr) : static_cast<double>(*static_cast<const float*>(ptr));
  }
};

// kW consecutive elements, loaded and stored as whole 16-byte accesses when kW * sizeof(X) is a multiple
// of 16 (the caller checked the alignment), else as plain elements (the scalar path, kW = 1).
template <class X, int kW>
struct alignas((kW * sizeof(X)) % 16 == 0 ? 16 : alignof(X)) Elems {
  X v[kW];
};
template <int kW, class X>
FT_HOST_DEVICE FT_INLINE Elems<X, kW> load_elems(const X* p) {
  return *reinterpret_cast<const Elems<X, kW>*>(p);
}
template <int kW, class X>
FT_HOST_DEVICE FT_INLINE void store_elems(X* p, const Elems<X, kW>& e) {
  *reinterpret_cast<Elems<X, kW>*>(p) = e;
}

FT_HOST_DEVICE FT_INLINE bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The rounding of a block's chunk (stochastic_round.h): stochastic for bf16 params when the launch has seeds, list
// seed_list's one-element int64 tensors (-1: none), the counter being the step after this step's increment, the
// chunk's elements drawing the bits of their index plus the slot's index base (launches with index bases); else to
// nearest.
template <class T, class Meta>
FT_HOST_DEVICE FT_INLINE math::RunRounding chunk_rounding(const Meta& m, const BlockLocation& loc, int seed_list,
                                                          float step_after) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (seed_list >= 0 && seed_list < Meta::kDepth) {
      const int64_t seed = *static_cast<const int64_t*>(m.addresses[seed_list][loc.slot]);
      uint64_t first = static_cast<uint64_t>(loc.begin);
      if constexpr (Meta::kHasIndexBases) first += m.index_base[loc.slot];
      return math::RunRounding::make(true, math::rounding_stream(seed, static_cast<double>(step_after)), first);
    }
  }
  return math::RunRounding{};
}

// What every optimizer chunk shares: the param, its grad and up to three state buffers (nullptr when the
// optimizer's options leave one unused), elements [0, n) of the chunk, and how its params round.
template <class T>
struct ChunkPointers {
  using O = opmath_t<T>;
  T* param;
  T* grad;
  O* state[3];
  int64_t n;
  math::RunRounding rounding;
  FT_HOST_DEVICE FT_INLINE bool all_aligned16() const {
    return aligned16(param) && aligned16(grad) && aligned16(state[0]) && aligned16(state[1]) &&
           aligned16(state[2]);  // nullptr is aligned
  }
};

// Gradient handling common to all optimizers, as on the CPU: grads are divided by grad_scale (GradScaler's
// unscale) before the update; afterwards zeros are written (zero_grad), or the unscaled grad when there was
// a scale to remove.
struct GradPolicy {
  bool zero_grad;
  bool has_grad_scale;
};

// Updates elements [i, i + kW) with op.update(param, grad, state[3]) (all opmath).
template <int kW, class T, class Op>
FT_HOST_DEVICE FT_INLINE void update_elems(const ChunkPointers<T>& c, int64_t i, const Op& op, GradPolicy gp,
                                           opmath_t<T> grad_scale) {
  using O = opmath_t<T>;
  Elems<T, kW> p = load_elems<kW>(c.param + i);
  Elems<T, kW> g = load_elems<kW>(c.grad + i);
  Elems<O, kW> s[3] = {};
FT_UNROLL
  for (int k = 0; k < 3; ++k) {
    if (c.state[k] != nullptr) s[k] = load_elems<kW>(c.state[k] + i);
  }
FT_UNROLL
  for (int j = 0; j < kW; ++j) {
    O grad = static_cast<O>(g.v[j]);
    if (gp.has_grad_scale) grad = grad / grad_scale;
    O param = static_cast<O>(p.v[j]);
    O state[3] = {s[0].v[j], s[1].v[j], s[2].v[j]};
    op.update(param, grad, state);
    p.v[j] = static_cast<T>(c.rounding.apply(param, i + j));  // the one rounding of a bf16/fp16 param
    g.v[j] = gp.zero_grad ? static_cast<T>(0.0f) : static_cast<T>(grad);
FT_UNROLL
    for (int k = 0; k < 3; ++k) s[k].v[j] = state[k];
  }
  store_elems<kW>(c.param + i, p);
FT_UNROLL
  for (int k = 0; k < 3; ++k) {
    if (c.state[k] != nullptr) store_elems<kW>(c.state[k] + i, s[k]);
  }
  if (gp.zero_grad || gp.has_grad_scale) store_elems<kW>(c.grad + i, g);
}

// One thread's share of a chunk: 16-byte accesses where the chunk is aligned (thread t takes accesses
// t, t + n_threads, ..., so a warp reads 512 contiguous bytes per list), then the tail element by element.
template <class T, class Op>
FT_HOST_DEVICE FT_INLINE void update_chunk(const ChunkPointers<T>& c, const Op& op, GradPolicy gp,
                                           opmath_t<T> grad_scale, int thread, int n_threads) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t scalar_begin = 0;
  if (c.all_aligned16()) {
    const int64_t n_vec = c.n / kVec;
    for (int64_t v = thread; v < n_vec; v += n_threads) update_elems<kVec>(c, v * kVec, op, gp, grad_scale);
    scalar_begin = n_vec * kVec;
  }
  for (int64_t i = scalar_begin + thread; i < c.n; i += n_threads) update_elems<1>(c, i, op, gp, grad_scale);
}

// A skipped step (found_inf) still zeroes the grads it was asked to: the caller treats them as consumed.
template <class T>
FT_HOST_DEVICE FT_INLINE void zero_chunk_grads(const ChunkPointers<T>& c, int thread, int n_threads) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t scalar_begin = 0;
  if (aligned16(c.grad)) {
    Elems<T, kVec> zeros;
FT_UNROLL
    for (int j = 0; j < kVec; ++j) zeros.v[j] = static_cast<T>(0.0f);
    const int64_t n_vec = c.n / kVec;
    for (int64_t v = thread; v < n_vec; v += n_threads) store_elems<kVec>(c.grad + v * kVec, zeros);
    scalar_begin = n_vec * kVec;
  }
  for (int64_t i = scalar_begin + thread; i < c.n; i += n_threads) c.grad[i] = static_cast<T>(0.0f);
}

// One block's chunk of a step: the update, or, when found_inf or a bad target skips the step, only the grad
// zeroing it was asked for. Every functor ends here, so the skip policy lives in one place.
template <class T, class Op>
FT_HOST_DEVICE FT_INLINE void step_chunk(const ChunkPointers<T>& c, const Op& op, GradPolicy gp, bool skip,
                                         opmath_t<T> grad_scale, int thread, int n_threads) {
  if (skip) {
    if (gp.zero_grad) zero_chunk_grads(c, thread, n_threads);
    return;
  }
  update_chunk(c, op, gp, grad_scale, thread, n_threads);
}

// The chunk of one block; list k of the launch maps to state[k - 2], lists past Depth are absent.
template <class T, class Meta>
FT_HOST_DEVICE FT_INLINE ChunkPointers<T> chunk_pointers(const Meta& m, const BlockLocation& loc,
                                                         const int (&state_list)[3]) {
  using O = opmath_t<T>;
  ChunkPointers<T> c;
  c.param = static_cast<T*>(m.addresses[0][loc.slot]) + loc.begin;
  c.grad = static_cast<T*>(m.addresses[1][loc.slot]) + loc.begin;
FT_UNROLL
  for (int k = 0; k < 3; ++k) {
    const int list = state_list[k];
    c.state[k] = list >= 2 && list < Meta::kDepth ? static_cast<O*>(m.addresses[list][loc.slot]) + loc.begin : nullptr;
  }
  c.n = loc.n;
  c.rounding = math::RunRounding{};
  return c;
}

// Scalars every functor shares, read once per block.
struct CommonScalars {
  ScalarArg lr, grad_scale, found_inf;
  // The device's bad-target step guard (bad_target.cuh), or nullptr: set by a loss kernel that met an
  // out-of-range target, it skips the step as found_inf does, so NaN gradients never reach the params.
  unsigned int* bad_target_guard;
  GradPolicy grads;
  FT_HOST_DEVICE bool skip_step() const {
    bool skip = false;
#if defined(__CUDA_ARCH__)
    if (bad_target_guard != nullptr) skip = bad_target_skips_step(bad_target_guard);
#endif
    return found_inf.load() != 0.0 || skip;
  }
};

// What SGD and RMSprop read once per block: lr (a device tensor under capturable use), GradScaler's scale
// and whether found_inf skips the step.
template <class O>
struct LrBlockScalars {
  O lr, grad_scale;
  float step_after;  // the step counter after this step (0 without one)
  bool skip;
};
template <class O>
FT_HOST_DEVICE LrBlockScalars<O> read_lr_block_scalars(const CommonScalars& common, float step_after) {
  LrBlockScalars<O> s;
  s.step_after = step_after;
  s.skip = common.skip_step();
  s.lr = static_cast<O>(common.lr.load());
  s.grad_scale = static_cast<O>(common.grad_scale.load());
  return s;
}

// ---------------------------------------------------------------------------------------------------
// SGD: lists param, grad[, momentum_buffer][, rounding seed]. With stochastic rounding it keeps step counters
// (kSteps), its rounding's counter.
template <class O>
struct SgdElementOp {
  math::SgdHyper<O> h;
  FT_HOST_DEVICE FT_INLINE void update(O& param, O grad, O (&state)[3]) const {
    math::sgd_update<O>(param, grad, &state[0], h);
  }
};

template <class T, int Depth, bool kSteps = false>
struct SgdFunctor {
  using O = opmath_t<T>;
  static constexpr bool kAdvancesSteps = kSteps;
  using BlockScalars = LrBlockScalars<O>;
  math::SgdHyper<O> hyper;  // lr filled in per block
  CommonScalars common;
  int seed_list;  // -1: round to nearest

  FT_HOST_DEVICE BlockScalars block_scalars(float step_after) const {
    return read_lr_block_scalars<O>(common, step_after);
  }
  FT_HOST_DEVICE bool advances_steps(const BlockScalars& s) const { return kSteps && !s.skip; }
  template <class Meta>
  FT_HOST_DEVICE void operator()(const Meta& m, const BlockLocation& loc, const BlockScalars& s, int thread,
                                 int n_threads) const {
    const int state_lists[3] = {hyper.has_momentum ? 2 : -1, -1, -1};
    ChunkPointers<T> c = chunk_pointers<T>(m, loc, state_lists);
    c.rounding = chunk_rounding<T>(m, loc, seed_list, s.step_after);
    SgdElementOp<O> op{hyper};
    op.h.lr = s.lr;
    step_chunk(c, op, common.grads, s.skip, s.grad_scale, thread, n_threads);
  }
};

// ---------------------------------------------------------------------------------------------------
// What Adam (fp32 and 8-bit state) reads once per block: the step's bias corrections, in double as torch computes
// them in Python floats (once per block, not per thread), the decoupled decay factor, GradScaler's scale and
// whether the step is skipped.
template <class O>
struct AdamBlockScalars {
  O neg_step_size, bc2_sqrt, decay_factor, grad_scale;
  float step_after;
  bool skip;
};
template <class O>
FT_HOST_DEVICE AdamBlockScalars<O> read_adam_block_scalars(const CommonScalars& common, double beta1, double beta2,
                                                           double weight_decay, float step_after) {
  AdamBlockScalars<O> s;
  s.step_after = step_after;
  s.skip = common.skip_step();
  const double lr = common.lr.load();
  const math::AdamStepScalars bc = math::adam_bias_correction(lr, beta1, beta2, static_cast<double>(step_after));
  s.neg_step_size = static_cast<O>(bc.neg_step_size);
  s.bc2_sqrt = static_cast<O>(bc.bc2_sqrt);
  s.decay_factor = static_cast<O>(1.0 - lr * weight_decay);
  s.grad_scale = static_cast<O>(common.grad_scale.load());
  return s;
}

// Adam / AdamW: lists param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq][, rounding seed].
template <class O>
struct AdamElementOp {
  math::AdamHyper<O> h;
  O neg_step_size, bc2_sqrt;
  FT_HOST_DEVICE FT_INLINE void update(O& param, O grad, O (&state)[3]) const {
    math::adam_update<O>(param, grad, state[0], state[1], &state[2], neg_step_size, bc2_sqrt, h);
  }
};

template <class T, int Depth>
struct AdamFunctor {
  using O = opmath_t<T>;
  static constexpr bool kAdvancesSteps = true;
  using BlockScalars = AdamBlockScalars<O>;
  math::AdamHyper<O> hyper;  // decay_factor (1 - lr·wd) filled in per block
  double beta1, beta2, weight_decay;
  CommonScalars common;
  int seed_list;  // -1: round to nearest

  FT_HOST_DEVICE BlockScalars block_scalars(float step_after) const {
    return read_adam_block_scalars<O>(common, beta1, beta2, weight_decay, step_after);
  }
  FT_HOST_DEVICE bool advances_steps(const BlockScalars& s) const { return !s.skip; }
  template <class Meta>
  FT_HOST_DEVICE void operator()(const Meta& m, const BlockLocation& loc, const BlockScalars& s, int thread,
                                 int n_threads) const {
    const int state_lists[3] = {2, 3, hyper.amsgrad ? 4 : -1};
    ChunkPointers<T> c = chunk_pointers<T>(m, loc, state_lists);
    c.rounding = chunk_rounding<T>(m, loc, seed_list, s.step_after);
    AdamElementOp<O> op{hyper, s.neg_step_size, s.bc2_sqrt};
    op.h.decay_factor = s.decay_factor;
    step_chunk(c, op, common.grads, s.skip, s.grad_scale, thread, n_threads);
  }
};

// ---------------------------------------------------------------------------------------------------
// RMSprop: lists param, grad, square_avg[, grad_avg if centered][, momentum_buffer if momentum > 0][, rounding
// seed].
template <class O>
struct RmspropElementOp {
  math::RmspropHyper<O> h;
  FT_HOST_DEVICE FT_INLINE void update(O& param, O grad, O (&state)[3]) const {
    math::rmsprop_update<O>(param, grad, state[0], &state[1], &state[2], h);
  }
};

template <class T, int Depth>
struct RmspropFunctor {
  using O = opmath_t<T>;
  static constexpr bool kAdvancesSteps = true;
  using BlockScalars = LrBlockScalars<O>;
  math::RmspropHyper<O> hyper;  // lr filled in per block
  CommonScalars common;
  int seed_list;  // -1: round to nearest

  FT_HOST_DEVICE BlockScalars block_scalars(float step_after) const {
    return read_lr_block_scalars<O>(common, step_after);
  }
  FT_HOST_DEVICE bool advances_steps(const BlockScalars& s) const { return !s.skip; }
  template <class Meta>
  FT_HOST_DEVICE void operator()(const Meta& m, const BlockLocation& loc, const BlockScalars& s, int thread,
                                 int n_threads) const {
    // The optional states are packed: grad_avg (centered) comes first, then momentum_buffer.
    const int grad_avg_list = hyper.centered ? 3 : -1;
    const int momentum_list = hyper.has_momentum ? (hyper.centered ? 4 : 3) : -1;
    const int state_lists[3] = {2, grad_avg_list, momentum_list};
    ChunkPointers<T> c = chunk_pointers<T>(m, loc, state_lists);
    c.rounding = chunk_rounding<T>(m, loc, seed_list, s.step_after);
    RmspropElementOp<O> op{hyper};
    op.h.lr = s.lr;
    step_chunk(c, op, common.grads, s.skip, s.grad_scale, thread, n_threads);
  }
};

// ---------------------------------------------------------------------------------------------------
// 8-bit state (Blockwise8bitFunctor): lists param, grad, the K moments' codes (uint8, the param's numel), their
// absmax (one fp32 per block of up to math::kQuantBlock elements of the slot's rows, math::QuantRows)[, rounding
// seed]. A chunk updates the blocks that start in it. On the device each warp takes one quantization block at a
// time, each lane elements lane, lane + 32, ... (every load and store of the warp contiguous): dequantize, update in
// fp32, each moment's new absmax by a warp reduction, quantize. The host path runs the same math block by block.

#if defined(__CUDACC__)
// The codes in device memory, initialised at module load (they are compile-time constants); each block copies
// them to shared memory, where the lanes' scattered lookups are cheap.
__device__ const math::DynamicCode kDeviceCodes[2] = {math::kSignedCode, math::kUnsignedCode};
#endif

// The ops of the 8-bit functor, as the CPU's (cpu/optimizer_kernels.h):
//   static constexpr int kMoments;  static constexpr bool is_signed(int k);  using BlockScalars;
//   BlockScalars block_scalars(const CommonScalars&, float step_after) const;
//   Op for_block(const BlockScalars&) const;         // the op with the block's lr-dependent scalars filled in
//   void update(float& param, float grad, float (&moment)[kMoments]) const;
// Adam / AdamW: exp_avg (signed), exp_avg_sq (unsigned).
struct Adam8bitElementOp {
  static constexpr int kMoments = 2;
  FT_HOST_DEVICE static constexpr bool is_signed(int k) { return k == 0; }
  using BlockScalars = AdamBlockScalars<float>;
  math::AdamHyper<float> h;  // decay_factor (1 - lr·wd) filled in per block
  double beta1, beta2, weight_decay;
  float neg_step_size, bc2_sqrt;  // per block
  FT_HOST_DEVICE BlockScalars block_scalars(const CommonScalars& common, float step_after) const {
    return read_adam_block_scalars<float>(common, beta1, beta2, weight_decay, step_after);
  }
  FT_HOST_DEVICE Adam8bitElementOp for_block(const BlockScalars& s) const {
    Adam8bitElementOp op = *this;
    op.h.decay_factor = s.decay_factor;
    op.neg_step_size = s.neg_step_size;
    op.bc2_sqrt = s.bc2_sqrt;
    return op;
  }
  FT_HOST_DEVICE FT_INLINE void update(float& param, float grad, float (&moment)[2]) const {
    math::adam_update<float>(param, grad, moment[0], moment[1], nullptr, neg_step_size, bc2_sqrt, h);
  }
};

// SGD: momentum_buffer (signed); with is_first_step it becomes the gradient.
struct Sgd8bitElementOp {
  static constexpr int kMoments = 1;
  FT_HOST_DEVICE static constexpr bool is_signed(int) { return true; }
  using BlockScalars = LrBlockScalars<float>;
  math::SgdHyper<float> h;  // lr filled in per block
  FT_HOST_DEVICE BlockScalars block_scalars(const CommonScalars& common, float step_after) const {
    return read_lr_block_scalars<float>(common, step_after);
  }
  FT_HOST_DEVICE Sgd8bitElementOp for_block(const BlockScalars& s) const {
    Sgd8bitElementOp op = *this;
    op.h.lr = s.lr;
    return op;
  }
  FT_HOST_DEVICE FT_INLINE void update(float& param, float grad, float (&moment)[1]) const {
    math::sgd_update<float>(param, grad, &moment[0], h);
  }
};

// RMSprop (not centered): square_avg (unsigned), then momentum_buffer (signed) with momentum.
template <bool kMomentum>
struct Rmsprop8bitElementOp {
  static constexpr int kMoments = 1 + int{kMomentum};
  FT_HOST_DEVICE static constexpr bool is_signed(int k) { return k > 0; }
  using BlockScalars = LrBlockScalars<float>;
  math::RmspropHyper<float> h;  // lr filled in per block
  FT_HOST_DEVICE BlockScalars block_scalars(const CommonScalars& common, float step_after) const {
    return read_lr_block_scalars<float>(common, step_after);
  }
  FT_HOST_DEVICE Rmsprop8bitElementOp for_block(const BlockScalars& s) const {
    Rmsprop8bitElementOp op = *this;
    op.h.lr = s.lr;
    return op;
  }
  FT_HOST_DEVICE FT_INLINE void update(float& param, float grad, float (&moment)[kMoments]) const {
    float unused = 0.0f;
    float* momentum_buf = &unused;
    if constexpr (kMomentum) momentum_buf = &moment[1];
    math::rmsprop_update<float>(param, grad, moment[0], nullptr, momentum_buf, h);
  }
};

// kSteps: the launch has step counters (all but SGD without stochastic rounding) and advances them.
template <class T, int Depth, class Op, bool kSteps = true>
struct Blockwise8bitFunctor {
  static constexpr bool kAdvancesSteps = kSteps;
  static constexpr int K = Op::kMoments;
  using BlockScalars = typename Op::BlockScalars;
  Op op;
  CommonScalars common;
  int seed_list;  // -1: round to nearest

  FT_HOST_DEVICE BlockScalars block_scalars(float step_after) const { return op.block_scalars(common, step_after); }
  FT_HOST_DEVICE bool advances_steps(const BlockScalars& s) const { return kSteps && !s.skip; }

  // Element e of a quantization block (p, g and codes start at the block): the update, with the moments
  // dequantized on entry and new on return. rounding_index: e's offset from the chunk's first element (a block
  // that starts in the chunk may end past it).
  FT_HOST_DEVICE FT_INLINE void update_element(T* p, T* g, uint8_t* const (&codes)[K], int64_t e,
                                               const float (&scale)[K], const math::DynamicCode* const (&code)[K],
                                               const Op& block_op, float grad_scale,
                                               const math::RunRounding& rounding, int64_t rounding_index,
                                               float (&moment)[K]) const {
    float grad = static_cast<float>(g[e]);
    if (common.grads.has_grad_scale) grad = grad / grad_scale;
    float param = static_cast<float>(p[e]);
FT_UNROLL
    for (int k = 0; k < K; ++k) moment[k] = code[k]->value[codes[k][e]] * scale[k];
    block_op.update(param, grad, moment);
    p[e] = static_cast<T>(rounding.apply(param, rounding_index));  // the one rounding of a bf16/fp16 param
    if (common.grads.zero_grad) {
      g[e] = static_cast<T>(0.0f);
    } else if (common.grads.has_grad_scale) {
      g[e] = static_cast<T>(grad);
    }
  }

  template <class Meta>
  FT_HOST_DEVICE void operator()(const Meta& m, const BlockLocation& loc, const BlockScalars& s, int thread,
                                 int n_threads) const {
    static_assert(Meta::kHasQuantRows, "8-bit launches carry each slot's quantization row length");
    const math::RunRounding rounding = chunk_rounding<T>(m, loc, seed_list, s.step_after);
    // Pointers to the tensor's element 0 and block 0: the chunk updates the quantization blocks that start in it,
    // whole (math::QuantRows), elements [start, start + size) of block b; rounding indices count from loc.begin.
    T* param = static_cast<T*>(m.addresses[0][loc.slot]);
    T* grad = static_cast<T*>(m.addresses[1][loc.slot]);
    uint8_t* codes[K];
    float* absmax[K];
FT_UNROLL
    for (int k = 0; k < K; ++k) {
      codes[k] = static_cast<uint8_t*>(m.addresses[2 + k][loc.slot]);
      absmax[k] = static_cast<float*>(m.addresses[2 + K + k][loc.slot]);
    }
    const Op block_op = op.for_block(s);
    const math::QuantRows rows = math::QuantRows::of(m.quant_row[loc.slot]);
    const int64_t first_block = rows.blocks_before(loc.begin);
    const int64_t n_blocks = rows.blocks_before(loc.begin + loc.n) - first_block;
#if defined(__CUDA_ARCH__)
    __shared__ math::DynamicCode shared_codes[2];
    {
      constexpr int kWords = static_cast<int>(sizeof(shared_codes) / sizeof(int32_t));
      static_assert(sizeof(shared_codes) % sizeof(int32_t) == 0, "copied as 32-bit words");
      const int32_t* from = reinterpret_cast<const int32_t*>(kDeviceCodes);
      int32_t* to = reinterpret_cast<int32_t*>(shared_codes);
      for (int w = thread; w < kWords; w += n_threads) to[w] = from[w];
      __syncthreads();
    }
    const math::DynamicCode* code[K];
FT_UNROLL
    for (int k = 0; k < K; ++k) code[k] = &shared_codes[Op::is_signed(k) ? 0 : 1];
    if (s.skip) {
      if (common.grads.zero_grad) {
        ChunkPointers<T> c{param + loc.begin, grad + loc.begin, {nullptr, nullptr, nullptr}, loc.n,
                           math::RunRounding{}};
        zero_chunk_grads(c, thread, n_threads);
      }
      return;
    }
    constexpr int kPerLane = static_cast<int>(math::kQuantBlock / 32);
    const int lane = thread & 31;
    for (int64_t j = thread / 32; j < n_blocks; j += n_threads / 32) {
      const int64_t b = first_block + j;
      const int64_t b0 = rows.start(b);
      const int64_t n = rows.size(b);
      float scale[K], max[K];
      uint8_t* block_codes[K];
FT_UNROLL
      for (int k = 0; k < K; ++k) {
        scale[k] = absmax[k][b];
        max[k] = 0.0f;
        block_codes[k] = codes[k] + b0;
      }
      float moments[kPerLane][K];
FT_UNROLL
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t e = i * 32 + lane;
FT_UNROLL
        for (int k = 0; k < K; ++k) moments[i][k] = 0.0f;
        if (e < n) {
          update_element(param + b0, grad + b0, block_codes, e, scale, code, block_op, s.grad_scale, rounding,
                         b0 - loc.begin + e, moments[i]);
          // the block's absmax, NaN-propagating: |x| for the unsigned moments too, as the CPU (sums of squares
          // unless RMSprop's alpha > 1 makes one negative)
FT_UNROLL
          for (int k = 0; k < K; ++k) max[k] = math::max_(max[k], fabsf(moments[i][k]));
        }
      }
      // The block's new absmax in every lane.
FT_UNROLL
      for (int offset = 16; offset > 0; offset >>= 1) {
FT_UNROLL
        for (int k = 0; k < K; ++k) max[k] = math::max_(max[k], __shfl_xor_sync(0xffffffffu, max[k], offset));
      }
      __syncwarp();  // every lane's read of the old absmax before lane 0 overwrites it
      if (lane == 0) {
FT_UNROLL
        for (int k = 0; k < K; ++k) absmax[k][b] = max[k];
      }
      float inverse[K];
FT_UNROLL
      for (int k = 0; k < K; ++k) inverse[k] = math::inverse_absmax(max[k]);
FT_UNROLL
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t e = i * 32 + lane;
        if (e < n) {
FT_UNROLL
          for (int k = 0; k < K; ++k) block_codes[k][e] = math::quantize_value(moments[i][k] * inverse[k], *code[k]);
        }
      }
    }
#else
    const math::DynamicCode* code[K];
    for (int k = 0; k < K; ++k) code[k] = Op::is_signed(k) ? &math::kSignedCode : &math::kUnsignedCode;
    if (s.skip) {
      if (common.grads.zero_grad) {
        ChunkPointers<T> c{param + loc.begin, grad + loc.begin, {nullptr, nullptr, nullptr}, loc.n,
                           math::RunRounding{}};
        zero_chunk_grads(c, thread, n_threads);
      }
      return;
    }
    for (int64_t j = thread; j < n_blocks; j += n_threads) {
      const int64_t b = first_block + j;
      const int64_t b0 = rows.start(b);
      const int64_t n = rows.size(b);
      float scale[K], max[K];
      uint8_t* block_codes[K];
      for (int k = 0; k < K; ++k) {
        scale[k] = absmax[k][b];
        max[k] = 0.0f;
        block_codes[k] = codes[k] + b0;
      }
      float moments[math::kQuantBlock][K];
      for (int64_t e = 0; e < n; ++e) {
        update_element(param + b0, grad + b0, block_codes, e, scale, code, block_op, s.grad_scale, rounding,
                       b0 - loc.begin + e, moments[e]);
        for (int k = 0; k < K; ++k) max[k] = math::max_(max[k], fabsf(moments[e][k]));  // NaN-propagating, as above
      }
      for (int k = 0; k < K; ++k) {
        absmax[k][b] = max[k];
        const float inverse = math::inverse_absmax(max[k]);
        for (int64_t e = 0; e < n; ++e) block_codes[k][e] = math::quantize_value(moments[e][k] * inverse, *code[k]);
      }
    }
#endif
  }
};

}  // namespace cuda
}  // namespace fused_train
