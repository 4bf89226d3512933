// CPU cross-entropy kernels, written once against at::vec and compiled once per instruction set
// (included by kernel_table.inl inside namespace fused_train::cpu::CPU_CAPABILITY). The math is
// fused_train/xent_math.h; this file only walks rows.
//
// Forward, one read of each row: every SIMD lane keeps its own running (max, sum, dot, asum) state, so the
// hot loop needs no horizontal reduction. Logits come in blocks of kBlockSteps steps (a step is two opmath
// vectors, the natural unit of bf16/fp16 widening); each block rescales the lanes' sums only if some
// lane's max grew, which after the first blocks is rare, so the forward costs about one exp per logit.
// The lanes are folded into one row state at the end of the row. A row that fits in one block (small
// vocabularies) is held in registers instead: row max first, then one exp per logit, no lanes to fold.
// Up to 16 classes with class-index targets and no smoothing (the tutorial's 10), rows go across the lanes
// instead, a block of V::size() rows at a time (forward_row_groups). So do the rows of the (batch, classes,
// positions) layout, whose neighbouring positions are already side by side (forward_positions).
//
// Gradient, one write per logit: p_j = exp(x_j - lse), then the true-class element is recomputed in opmath
// and stored once more. The forward writes it (when asked) right after the row's scan, while the row is
// still in cache; the backward reads the row again from memory with the saved log-sum-exp.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "fused_train/xent_math.h"

// The row loops inline everything they call, at::vec's exp included (left out of line, it costs a call per
// vector and the short rows of small vocabularies pay it the most).
#if defined(__GNUC__)
#define FT_XENT_FLATTEN __attribute__((flatten))
#else
#define FT_XENT_FLATTEN
#endif

namespace fused_train {
namespace cpu {
namespace CPU_CAPABILITY {

// Opmath of a storage type: fp32 for bf16/fp16, else the type itself.
template <class T>
using XentOpmath = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Two opmath vectors of T: one Vectorized<BFloat16>/<Half> widened, or two float/double vectors.
template <class T>
struct StepIO {
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  static constexpr int64_t kWidth = 2 * V::size();

  static void load(const T* p, V& lo, V& hi) {
    if constexpr (std::is_same_v<T, O>) {
      lo = V::loadu(p);
      hi = V::loadu(p + V::size());
    } else {
      at::vec::load_to_float<T>(p, lo, hi);
    }
  }
  static void store(T* p, const V& lo, const V& hi) {
    if constexpr (std::is_same_v<T, O>) {
      lo.store(p);
      hi.store(p + V::size());
    } else {
      at::vec::convert_from_float<T>(lo, hi).store(p);
    }
  }
  // The last n < kWidth elements, the rest of the step filled with `pad` (masked loads and stores where
  // the instruction set has them: a short row is all tail).
  static void load_partial(const T* p, int64_t n, T pad, V& lo, V& hi) {
    if constexpr (std::is_same_v<T, O>) {
      const int64_t n_lo = std::min<int64_t>(n, V::size());
      lo = V::set(V(pad), V::loadu(p, n_lo), n_lo);
      hi = n > V::size() ? V::set(V(pad), V::loadu(p + V::size(), n - V::size()), n - V::size()) : V(pad);
    } else {
      // Through a padded buffer, not Vectorized<T>::set: torch 2.5's AVX-512 set/blend of bf16/fp16 reads
      // lanes out of bounds (garbage instead of the padding).
      using TV = at::vec::Vectorized<T>;
      alignas(64) T padded[TV::size()];
      for (int64_t i = 0; i < TV::size(); ++i) padded[i] = i < n ? p[i] : pad;
      std::tie(lo, hi) = at::vec::convert_to_float<T>(TV::loadu(padded));
    }
  }
  static void store_partial(T* p, int64_t n, const V& lo, const V& hi) {
    if constexpr (std::is_same_v<T, O>) {
      lo.store(p, std::min<int64_t>(n, V::size()));
      if (n > V::size()) hi.store(p + V::size(), n - V::size());
    } else {
      at::vec::convert_from_float<T>(lo, hi).store(p, static_cast<int>(n));
    }
  }
};

// The steps of one block: logits x and, for rows with a linear term, their coefficients a.
constexpr int kBlockSteps = 4;

template <class O>
struct LaneState {
  using V = at::vec::Vectorized<O>;
  V max = V(-std::numeric_limits<O>::infinity());
  V sum = V(0);
  V dot = V(0);
  V asum = V(0);
  // Σ x·2^-100 per lane: NaN iff a logit was NaN (or both +inf and -inf were seen, and +inf alone already
  // makes the row NaN). It lets the lane max use the plain max instruction, a quarter of the cost of a
  // NaN-propagating one, and still lets a NaN logit poison its row as in torch.
  V nan_probe = V(0);
};

// Folds a block of nv vectors into the lanes. valid: how many of the block's elements are real (the rest
// are padding: x = -inf, a = 0), which only matters for the dot product, where 0 * -inf would be NaN.
template <class O, bool kLinear, int kMaxVecs>
FT_INLINE void update_lanes(LaneState<O>& st, const at::vec::Vectorized<O> (&x)[kMaxVecs],
                            const at::vec::Vectorized<O> (&a)[kMaxVecs], int nv, int64_t valid) {
  using V = at::vec::Vectorized<O>;
  const V tiny(O(7.888609052210118e-31));  // 2^-100: no finite logit overflows the probe
  // clamp_min(a, b) is max(a, b) without NaN propagation: the probe takes care of NaN.
  V block_max = x[0];
  st.nan_probe = at::vec::fmadd(x[0], tiny, st.nan_probe);
  for (int k = 1; k < nv; ++k) {
    block_max = at::vec::clamp_min(block_max, x[k]);
    st.nan_probe = at::vec::fmadd(x[k], tiny, st.nan_probe);
  }
  const V new_max = at::vec::clamp_min(st.max, block_max);
  constexpr int kAllLanes = (1 << V::size()) - 1;
  // zero_mask() of a comparison is the lanes where it is false: anything else means a max grew.
  if (V(new_max != st.max).zero_mask() != kAllLanes) {
    const V new_shift = math::safe_shift(new_max);
    // Raw old max in the exp (see math::combine): a lane that saw only -inf has sum 0 and must keep it.
    st.sum = st.sum * math::exp_(st.max - new_shift);
    if constexpr (kLinear) st.dot = at::vec::fmadd(st.asum, math::safe_shift(st.max) - new_shift, st.dot);
    st.max = new_max;
  }
  const V shift = math::safe_shift(st.max);
  for (int k = 0; k < nv; ++k) {
    const V centred = x[k] - shift;
    st.sum = st.sum + math::exp_(centred);
    if constexpr (kLinear) {
      const int64_t lane_begin = static_cast<int64_t>(k) * V::size();
      const V term = valid >= lane_begin + V::size()
                         ? a[k] * centred
                         : V::set(V(0), a[k] * centred, std::max<int64_t>(0, valid - lane_begin));
      st.dot = st.dot + term;
      st.asum = st.asum + a[k];
    }
  }
}

// Folds the lanes into one row state (math::combine over lanes, vectorised: one exp for all lanes).
template <class O>
math::RowState<O> fold_lanes(const LaneState<O>& st) {
  using V = at::vec::Vectorized<O>;
  alignas(64) O lane_max[V::size()];
  st.max.store(lane_max);
  O m = lane_max[0];
  for (int64_t i = 1; i < V::size(); ++i) m = math::max_(m, lane_max[i]);
  const V shift(math::safe_shift(m));
  const V delta = math::safe_shift(st.max) - shift;
  const auto add = [](const V& p, const V& q) { return p + q; };
  math::RowState<O> r;
  r.max = m;
  r.sum = at::vec::vec_reduce_all<O>(add, st.sum * math::exp_(st.max - shift));
  r.dot = at::vec::vec_reduce_all<O>(add, at::vec::fmadd(st.asum, delta, st.dot));
  r.asum = at::vec::vec_reduce_all<O>(add, st.asum);
  const O probe = at::vec::vec_reduce_all<O>(add, st.nan_probe);
  if (probe != probe) r.max = probe;  // a NaN logit: the row's loss and gradient are NaN, as in torch
  return r;
}

template <class O>
math::XentHyper<O> xent_hyper(const CrossEntropyLaunch& l) {
  return {O(1.0 - l.label_smoothing), O(l.label_smoothing / static_cast<double>(l.classes)),
          O(l.class_weight_sum), O(l.lse_square_scale), l.label_smoothing > 0.0};
}

template <class O>
math::XentHyper<at::vec::Vectorized<O>> broadcast(const math::XentHyper<O>& h) {
  using V = at::vec::Vectorized<O>;
  return {V(h.one_minus_smoothing), V(h.smoothing_over_classes), V(h.class_weight_sum), V(h.lse_square_scale),
          h.smoothing};
}

// Linear coefficients a_j of the n <= kWidth elements from j: class weights (class-index rows) or w_j·t'_j
// (probability rows); 0 past the row's end.
template <class T, bool kProb>
FT_INLINE void load_coefficients(const CrossEntropyLaunch& l, const T* target_row, int64_t j, int64_t n,
                                 const math::XentHyper<at::vec::Vectorized<XentOpmath<T>>>& hv,
                                 at::vec::Vectorized<XentOpmath<T>>& lo, at::vec::Vectorized<XentOpmath<T>>& hi) {
  using V = at::vec::Vectorized<XentOpmath<T>>;
  const XentOpmath<T>* w = static_cast<const XentOpmath<T>*>(l.weight) + j;
  if (n == StepIO<T>::kWidth) {
    lo = V::loadu(w);
    hi = V::loadu(w + V::size());
  } else {
    lo = V::loadu(w, std::min<int64_t>(n, V::size()));
    hi = n > V::size() ? V::loadu(w + V::size(), n - V::size()) : V(0);
  }
  if constexpr (kProb) {
    V t_lo, t_hi;
    if (n == StepIO<T>::kWidth) {
      StepIO<T>::load(target_row + j, t_lo, t_hi);
    } else {
      StepIO<T>::load_partial(target_row + j, n, T(0), t_lo, t_hi);
    }
    lo = lo * math::smoothed_target(t_lo, hv);
    hi = hi * math::smoothed_target(t_hi, hv);
  }
}

// The state of a row that fits in one block (C <= kBlockSteps steps, e.g. the 10 classes of a tutorial):
// all of it is in registers, so the row max comes first and the exps need no rescaling.
template <class T, bool kProb, bool kLinear>
FT_INLINE math::RowState<XentOpmath<T>> scan_short_row(const CrossEntropyLaunch& l, const T* x, const T* target_row,
                                                       const math::XentHyper<at::vec::Vectorized<XentOpmath<T>>>& hv) {
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  using IO = StepIO<T>;
  const int64_t C = l.classes;
  const T neg_inf = T(-std::numeric_limits<float>::infinity());
  V xs[2 * kBlockSteps];
  V as[2 * kBlockSteps];
  int nv = 0;
  for (int64_t j = 0; j < C; j += IO::kWidth, nv += 2) {
    const int64_t n = std::min<int64_t>(IO::kWidth, C - j);
    if (n == IO::kWidth) {
      IO::load(x + j, xs[nv], xs[nv + 1]);
    } else {
      IO::load_partial(x + j, n, neg_inf, xs[nv], xs[nv + 1]);
    }
    if constexpr (kLinear) load_coefficients<T, kProb>(l, target_row, j, n, hv, as[nv], as[nv + 1]);
  }
  const auto add = [](const V& p, const V& q) { return p + q; };
  const auto max = [](const V& p, const V& q) { return at::vec::maximum(p, q); };
  V vmax = xs[0];
  for (int k = 1; k < nv; ++k) vmax = at::vec::maximum(vmax, xs[k]);
  math::RowState<O> r;
  r.max = at::vec::vec_reduce_all<O>(max, vmax);
  const V shift(math::safe_shift(r.max));
  V sum(0), dot(0), asum(0);
  for (int k = 0; k < nv; ++k) {
    const V centred = xs[k] - shift;
    sum = sum + math::exp_(centred);
    if constexpr (kLinear) {
      // Padding lanes have a = 0 and x = -inf: leave them out of the dot product (0 · -inf = NaN).
      const int64_t lane_begin = static_cast<int64_t>(k) * V::size();
      dot = dot + (C >= lane_begin + V::size() ? as[k] * centred
                                               : V::set(V(0), as[k] * centred, std::max<int64_t>(0, C - lane_begin)));
      asum = asum + as[k];
    }
  }
  r.sum = at::vec::vec_reduce_all<O>(add, sum);
  r.dot = kLinear ? at::vec::vec_reduce_all<O>(add, dot) : O(0);
  r.asum = kLinear ? at::vec::vec_reduce_all<O>(add, asum) : O(0);
  return r;
}

// One row's state, reading the row once. kLinear: accumulate the linear term (label smoothing of a
// class-index row, or any probability row).
template <class T, bool kProb, bool kLinear>
math::RowState<XentOpmath<T>> scan_row(const CrossEntropyLaunch& l, const T* x, const T* target_row,
                                       const math::XentHyper<at::vec::Vectorized<XentOpmath<T>>>& hv) {
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  using IO = StepIO<T>;
  constexpr int kVecs = 2 * kBlockSteps;
  const int64_t C = l.classes;
  const T neg_inf = T(-std::numeric_limits<float>::infinity());
  LaneState<O> st;
  V xs[kVecs];
  V as[kVecs];
  if constexpr (!kLinear) {
    for (auto& a : as) a = V(0);
  }
  int64_t j = 0;
  for (; j + kBlockSteps * IO::kWidth <= C; j += kBlockSteps * IO::kWidth) {
    for (int s = 0; s < kBlockSteps; ++s) {
      IO::load(x + j + s * IO::kWidth, xs[2 * s], xs[2 * s + 1]);
      if constexpr (kLinear) load_coefficients<T, kProb>(l, target_row, j + s * IO::kWidth, IO::kWidth, hv,
                                                         as[2 * s], as[2 * s + 1]);
    }
    update_lanes<O, kLinear>(st, xs, as, kVecs, kVecs * V::size());
  }
  // The rest of the row (less than a block) as one shorter block, its last step padded.
  if (j < C) {
    const int64_t rest = C - j;
    int s = 0;
    for (; (s + 1) * IO::kWidth <= rest; ++s) {
      IO::load(x + j + s * IO::kWidth, xs[2 * s], xs[2 * s + 1]);
      if constexpr (kLinear) load_coefficients<T, kProb>(l, target_row, j + s * IO::kWidth, IO::kWidth, hv,
                                                         as[2 * s], as[2 * s + 1]);
    }
    const int64_t partial = rest - s * IO::kWidth;
    if (partial > 0) {
      IO::load_partial(x + j + s * IO::kWidth, partial, neg_inf, xs[2 * s], xs[2 * s + 1]);
      if constexpr (kLinear) load_coefficients<T, kProb>(l, target_row, j + s * IO::kWidth, partial, hv,
                                                         as[2 * s], as[2 * s + 1]);
      ++s;
    }
    update_lanes<O, kLinear>(st, xs, as, 2 * s, rest);
  }
  return fold_lanes(st);
}

FT_INLINE int64_t read_index(const CrossEntropyLaunch& l, int64_t r) {
  return l.target_is_int32 ? static_cast<const int32_t*>(l.target)[r * l.target_row_stride]
                           : static_cast<const int64_t*>(l.target)[r * l.target_row_stride];
}

// Writes one row's gradient g (which may be the row x itself: each element is read before it is written,
// and the true-class logit x_t was read by the caller) from its log-sum-exp. scale: grad_out_r / denominator.
// t: the class index (class-index rows, not ignored); target_mass: A_r = Σ w_j·t'_j (probability rows).
template <class T, bool kProb, bool kLinear>
FT_INLINE void write_row_grad(const CrossEntropyLaunch& l, const T* x, T* g, const T* target_row, int64_t t,
                              XentOpmath<T> x_t, const math::RowLse<XentOpmath<T>>& lse, XentOpmath<T> scale,
                              XentOpmath<T> target_mass,
                              const math::XentHyper<XentOpmath<T>>& h,
                              const math::XentHyper<at::vec::Vectorized<XentOpmath<T>>>& hv) {
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  using IO = StepIO<T>;
  const int64_t C = l.classes;
  const O* weight = static_cast<const O*>(l.weight);
  const math::RowGrad<O> rg = kProb ? math::prob_row_grad(scale, lse, target_mass, h)
                                    : math::index_row_grad(scale, lse, weight != nullptr ? weight[t] : O(1), h);
  const V v_shift(rg.shift), v_log_sum(rg.log_sum), v_softmax(rg.softmax_coef), v_linear(rg.linear_coef);
  V lo, hi, a_lo(0), a_hi(0);
  int64_t j = 0;
  // Without a linear term a = 0 and the element is softmax_coef·p alone: spare the multiply-subtract.
  const auto element = [&](const V& xv, const V& av) {
    if constexpr (kLinear) return math::grad_element(xv, av, v_shift, v_log_sum, v_softmax, v_linear);
    return v_softmax * math::exp_((xv - v_shift) - v_log_sum);
  };
  for (; j + IO::kWidth <= C; j += IO::kWidth) {
    IO::load(x + j, lo, hi);
    if constexpr (kLinear) load_coefficients<T, kProb>(l, target_row, j, IO::kWidth, hv, a_lo, a_hi);
    IO::store(g + j, element(lo, a_lo), element(hi, a_hi));
  }
  if (j < C) {
    const int64_t n = C - j;
    IO::load_partial(x + j, n, T(0), lo, hi);
    if constexpr (kLinear) load_coefficients<T, kProb>(l, target_row, j, n, hv, a_lo, a_hi);
    IO::store_partial(g + j, n, element(lo, a_lo), element(hi, a_hi));
  }
  if constexpr (!kProb) {
    // The true class's (p_t - 1)-like value in opmath, rounded once; the vector pass rounded p_t alone.
    const O a_t = kLinear ? weight[t] : O(0);
    g[t] = static_cast<T>(math::target_grad(x_t, a_t, rg));
  }
}

// Stores one row's loss and z-loss for reduction='none' (l.row_loss set): in the logits' dtype, or opmath.
template <class T>
FT_INLINE void store_row_loss(const CrossEntropyLaunch& l, int64_t r, XentOpmath<T> loss, XentOpmath<T> z_loss) {
  using O = XentOpmath<T>;
  if (l.loss_opmath) {
    static_cast<O*>(l.row_loss)[r] = loss;
    static_cast<O*>(l.row_z_loss)[r] = z_loss;
  } else {
    static_cast<T*>(l.row_loss)[r] = static_cast<T>(loss);
    static_cast<T*>(l.row_z_loss)[r] = static_cast<T>(z_loss);
  }
}

// Stores one row's results: its log-sum-exp, and its loss and z-loss (per row for reduction='none', else
// added to sums, in row order).
template <class T>
FT_INLINE void store_row_results(const CrossEntropyLaunch& l, int64_t r, const math::RowLse<XentOpmath<T>>& lse,
                                 XentOpmath<T> loss, XentOpmath<T> z_loss, CrossEntropySums& sums) {
  using O = XentOpmath<T>;
  static_cast<O*>(l.lse)[2 * r] = lse.shift;
  static_cast<O*>(l.lse)[2 * r + 1] = lse.log_sum;
  if (l.row_loss != nullptr) {
    store_row_loss<T>(l, r, loss, z_loss);
  } else {
    sums.loss += static_cast<double>(loss);
    sums.z_loss += static_cast<double>(z_loss);
  }
}

// Rows of at most kGroupClasses classes (the 10 of a tutorial) with class-index targets and no label
// smoothing: V::size() rows at a time, one row per lane. One row at a time, such a row is a vector or two
// of padding-filled lanes, two horizontal reductions and a scalar log, all latency. Transposed into a
// scratch block (one vector per class), the row max, the sum of exps and the log are plain vector operations
// over rows. The loss and the target's gradient element are per row, in the same math as the other paths,
// and every other gradient element is the same expression as write_row_grad's.
constexpr int64_t kGroupClasses = 16;

template <class T>
FT_XENT_FLATTEN CrossEntropySums forward_row_groups(const CrossEntropyLaunch& l, int64_t row_begin,
                                                    int64_t row_end) {
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  constexpr int64_t G = V::size();
  const math::XentHyper<O> h = xent_hyper<O>(l);
  const O* weight = static_cast<const O*>(l.weight);
  const O grad_scale = l.grad != nullptr ? math::mean_scale(O(1), *static_cast<const O*>(l.denominator)) : O(0);
  const int64_t C = l.classes;
  alignas(64) O xt[kGroupClasses][G];  // xt[c][i]: logit c of row r + i (rows past the end: zeros)
  alignas(64) O shifts[G], log_sums[G], coefs[G], target_logits[G];
  int64_t targets[G];
  math::RowGrad<O> row_grads[G];
  CrossEntropySums sums;
  for (int64_t r = row_begin; r < row_end; r += G) {
    const int64_t n = std::min<int64_t>(G, row_end - r);
    for (int64_t i = 0; i < G; ++i) {
      if (i < n) {
        const T* x = static_cast<const T*>(l.logits) + (r + i) * l.logits_row_stride;
        for (int64_t c = 0; c < C; ++c) xt[c][i] = static_cast<O>(x[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) xt[c][i] = O(0);
      }
      coefs[i] = O(0);  // ignored rows and rows past the end: no gradient
    }
    V max = V::loadu(xt[0]);
    for (int64_t c = 1; c < C; ++c) max = at::vec::maximum(max, V::loadu(xt[c]));  // NaN-propagating
    const V shift = math::safe_shift(max);
    V sum(0);
    for (int64_t c = 0; c < C; ++c) sum = sum + math::exp_(V::loadu(xt[c]) - shift);
    shift.store(shifts);
    math::finish_log_sums(max, sum).store(log_sums);
    for (int64_t i = 0; i < n; ++i) {
      const math::RowLse<O> lse{shifts[i], log_sums[i]};
      const int64_t t = targets[i] = read_index(l, r + i);
      O loss = 0, z_loss = 0;
      if (t != l.ignore_index) {
        const O w_t = weight != nullptr ? weight[t] : O(1);
        target_logits[i] = xt[t][i];
        // Without smoothing the row state enters the loss through its log-sum-exp alone.
        loss = math::index_row_loss(math::empty_row_state<O>(), lse, target_logits[i], w_t, h);
        z_loss = math::z_loss(lse, h);
        row_grads[i] = math::index_row_grad(grad_scale, lse, w_t, h);
        coefs[i] = row_grads[i].softmax_coef;
      }
      store_row_results<T>(l, r + i, lse, loss, z_loss, sums);
    }
    if (l.grad == nullptr) continue;
    // softmax_coef · exp((x - shift) - log_sum) for every element, as write_row_grad computes it, in place.
    const V v_shift = V::loadu(shifts), v_log_sum = V::loadu(log_sums), v_coef = V::loadu(coefs);
    for (int64_t c = 0; c < C; ++c) (v_coef * math::exp_((V::loadu(xt[c]) - v_shift) - v_log_sum)).store(xt[c]);
    for (int64_t i = 0; i < n; ++i) {
      T* g = static_cast<T*>(l.grad) + (r + i) * l.grad_row_stride;
      const int64_t t = targets[i];
      if (t == l.ignore_index) {
        std::memset(static_cast<void*>(g), 0, C * sizeof(T));
        continue;
      }
      for (int64_t c = 0; c < C; ++c) g[c] = static_cast<T>(xt[c][i]);
      // The true class in opmath, rounded once, as write_row_grad.
      g[t] = static_cast<T>(math::target_grad(target_logits[i], O(0), row_grads[i]));
    }
  }
  return sums;
}

// ---- The (batch, classes, positions) layout: positions across the lanes ----
// A segmentation loss's logits (N, C, d1, …, dK) hold each position's C classes at stride d1·…·dK, and
// neighbouring positions side by side. So a step of kWidth positions is one vector pair per class, a row per
// lane, and everything per row is a vector operation, the loss and the gradient's constants included: no
// transpose, no copy of the logits into rows (torch's log_softmax over dim 1 walks them the same way), and no
// per-row scalar work beyond gathering each row's target and storing its results. Each step is read from memory
// once, into a contiguous scratch of C vector pairs (forward: while taking the max), and worked on there: the
// forward's exps replace it, so that the gradient takes a multiply per element instead of a second exp.

// Steps ahead that a step's first read asks the memory for, class by class: a step's C classes are C streams
// (more than the hardware prefetchers follow at once). In a probe at (8, 21, 512, 512) fp32, 2 threads, Zen 4
// (a build with the distance from the environment, not kept), the forward took 0.77x the time of no prefetch at
// 2 steps, 0.86x at 1, 4 and 8.
constexpr int64_t kPrefetchSteps = 2;

// Asks for the two cache lines of a step (kWidth elements from p, up to 64 bytes each; prefetches do not fault).
template <class T>
FT_INLINE void prefetch_step(const T* p) {
  __builtin_prefetch(p);
  __builtin_prefetch(reinterpret_cast<const char*>(p) + 64);
}

// Runs fn(r, offset, n) over the steps of rows [row_begin, row_end): n <= kWidth rows from row r, all of one
// batch entry, the first one's class 0 at element offset.
template <int64_t kWidth, class Fn>
FT_INLINE void for_each_position_step(const CrossEntropyLaunch& l, int64_t row_begin, int64_t row_end, Fn&& fn) {
  const int64_t positions = l.positions;
  int64_t r = row_begin;
  while (r < row_end) {
    const int64_t batch = r / positions;
    const int64_t end = std::min(row_end, (batch + 1) * positions);
    int64_t offset = batch * l.classes * positions + r % positions;
    while (r < end) {
      const int64_t n = std::min(kWidth, end - r);
      fn(r, offset, n);
      r += n;
      offset += n;
    }
  }
}

// n <= kWidth neighbouring elements from p (a step of lanes), the rest 0: the padding lanes stay finite.
template <class T>
FT_INLINE void load_step(const T* p, int64_t n, at::vec::Vectorized<XentOpmath<T>> (&v)[2]) {
  if (n == StepIO<T>::kWidth) {
    StepIO<T>::load(p, v[0], v[1]);
  } else {
    StepIO<T>::load_partial(p, n, T(0), v[0], v[1]);
  }
}

template <class T>
FT_INLINE void store_step(T* p, int64_t n, const at::vec::Vectorized<XentOpmath<T>> (&v)[2]) {
  if (n == StepIO<T>::kWidth) {
    StepIO<T>::store(p, v[0], v[1]);
  } else {
    StepIO<T>::store_partial(p, n, v[0], v[1]);
  }
}

// A lane array (kWidth values) as a vector pair, and back.
template <class O>
FT_INLINE void load_lanes(const O* lanes, at::vec::Vectorized<O> (&v)[2]) {
  v[0] = at::vec::Vectorized<O>::loadu(lanes);
  v[1] = at::vec::Vectorized<O>::loadu(lanes + at::vec::Vectorized<O>::size());
}
template <class O>
FT_INLINE void store_lanes(O* lanes, const at::vec::Vectorized<O> (&v)[2]) {
  v[0].store(lanes);
  v[1].store(lanes + at::vec::Vectorized<O>::size());
}

// A step's linear coefficients at class c, a row per lane: w_c, times t'_c for probabilities.
template <class T, bool kProb>
FT_INLINE void step_coefficients(const CrossEntropyLaunch& l, int64_t offset, int64_t n, int64_t c,
                                 const math::XentHyper<at::vec::Vectorized<XentOpmath<T>>>& hv,
                                 at::vec::Vectorized<XentOpmath<T>> (&a)[2]) {
  using V = at::vec::Vectorized<XentOpmath<T>>;
  const V w(static_cast<const XentOpmath<T>*>(l.weight)[c]);
  if constexpr (kProb) {
    load_step(static_cast<const T*>(l.target) + offset + c * l.positions, n, a);
    for (int k = 0; k < 2; ++k) a[k] = w * math::smoothed_target(a[k], hv);
  } else {
    a[0] = a[1] = w;
  }
}

// What a step's gradient needs per row, a row per lane: its log-sum-exp, the gradient's constants (math::RowGrad
// as vectors), the class-index targets, and which rows are written (the backward's keep_unit_rows leaves rows
// as they are) and which are 0 (ignored).
template <class T>
struct StepGrad {
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  static constexpr int64_t W = StepIO<T>::kWidth;
  V shift[2], log_sum[2];
  V softmax_coef[2], linear_coef[2], target_coef[2];
  V target_logit[2], target_weight[2];  // class index: x_t, and w_t (0 where ignored; 1 unweighted)
  V zero[2];                            // mask: ignored rows
  V keep[2];                            // mask: rows left as they are
  bool zeros_some = false;              // some of the step's rows are ignored
  bool keeps_some = false;
  int64_t target[W];                    // class index, -1 where ignored or past the step's rows
  bool write[W];
};

// Reads the class-index targets of a step's n rows from r, their logits at x with classes class_stride apart
// (the logits, or the forward's copy of the step), before anything is written over them: target, target_logit,
// target_weight and zero. Lanes past n count as ignored.
template <class T, class U>
FT_INLINE void gather_step_targets(const CrossEntropyLaunch& l, int64_t r, int64_t n, const U* x,
                                   int64_t class_stride, StepGrad<T>& sg) {
  using O = XentOpmath<T>;
  constexpr int64_t W = StepGrad<T>::W;
  const O* weight = static_cast<const O*>(l.weight);
  alignas(64) O logit[W], w[W], ignored[W];
  sg.zeros_some = false;
  for (int64_t i = 0; i < W; ++i) {
    const int64_t t = i < n ? read_index(l, r + i) : l.ignore_index;
    const bool kept = i < n && t != l.ignore_index;
    sg.target[i] = kept ? t : -1;
    logit[i] = kept ? static_cast<O>(x[t * class_stride + i]) : O(0);
    w[i] = kept ? (weight != nullptr ? weight[t] : O(1)) : O(0);
    ignored[i] = kept ? O(0) : O(1);
    sg.zeros_some = sg.zeros_some || (i < n && !kept);
  }
  load_lanes(logit, sg.target_logit);
  load_lanes(w, sg.target_weight);
  load_lanes(ignored, sg.zero);
  for (int k = 0; k < 2; ++k) sg.zero[k] = sg.zero[k] != at::vec::Vectorized<O>(0);
}

// The gradient's constants (math::index_row_grad / prob_row_grad, lane by lane, in their order of operations)
// for row scales `scale` (grad_loss / denominator) and probability rows' target masses.
template <class T, bool kProb>
FT_INLINE void step_grad_constants(const math::XentHyper<XentOpmath<T>>& h,
                                   const at::vec::Vectorized<XentOpmath<T>> (&scale)[2],
                                   const at::vec::Vectorized<XentOpmath<T>> (&target_mass)[2], StepGrad<T>& sg) {
  using V = at::vec::Vectorized<XentOpmath<T>>;
  const V two_z(XentOpmath<T>(2) * h.lse_square_scale);
  for (int k = 0; k < 2; ++k) {
    const V full = sg.shift[k] + sg.log_sum[k];
    if constexpr (kProb) {
      sg.softmax_coef[k] = scale[k] * (target_mass[k] + two_z * full);
      sg.linear_coef[k] = scale[k];
      sg.target_coef[k] = V(0);
    } else {
      const V a = V(h.one_minus_smoothing) * sg.target_weight[k] + V(h.smoothing_over_classes * h.class_weight_sum);
      sg.softmax_coef[k] = scale[k] * (a + two_z * full);
      sg.linear_coef[k] = scale[k] * V(h.smoothing_over_classes);
      sg.target_coef[k] = scale[k] * V(h.one_minus_smoothing) * sg.target_weight[k];
    }
  }
}

// Writes a step's gradient, each element in opmath and rounded once: softmax_coef·p − linear_coef·a, minus
// target_coef at the target. staged holds the step in opmath, kWidth lanes per class: with kFromExps the
// forward's exps exp(x - shift), p = e / sum (sums: their sums), else the logits, p = exp((x - shift) - log_sum)
// as write_row_grad's vector pass computes it (its true-class element takes the scalar exp: within an ulp or
// two). Probability rows' coefficients a come from coefs, staged likewise. So the logits are not read here: in
// place every element was read before any is written.
template <class T, bool kProb, bool kLinear, bool kFromExps>
FT_INLINE void write_step_grad(const CrossEntropyLaunch& l, int64_t offset, int64_t n, const StepGrad<T>& sg,
                               const math::XentHyper<at::vec::Vectorized<XentOpmath<T>>>& hv,
                               const XentOpmath<T>* staged, const XentOpmath<T>* coefs,
                               const at::vec::Vectorized<XentOpmath<T>> (&sums)[2]) {
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  constexpr int64_t W = StepGrad<T>::W;
  V coef[2];
  for (int k = 0; k < 2; ++k) coef[k] = kFromExps ? sg.softmax_coef[k] / sums[k] : sg.softmax_coef[k];
  T* g = static_cast<T*>(l.grad) + offset;
  for (int64_t c = 0; c < l.classes; ++c) {
    V p[2], a[2], out[2];
    load_lanes(staged + c * W, p);
    if constexpr (!kFromExps) {
      for (int k = 0; k < 2; ++k) p[k] = math::exp_((p[k] - sg.shift[k]) - sg.log_sum[k]);
    }
    if constexpr (kProb) {
      load_lanes(coefs + c * W, a);
    } else if constexpr (kLinear) {
      step_coefficients<T, kProb>(l, offset, n, c, hv, a);
    }
    for (int k = 0; k < 2; ++k) {
      out[k] = kLinear ? coef[k] * p[k] - sg.linear_coef[k] * a[k] : coef[k] * p[k];
      // An ignored row's gradient is 0, whatever its logits (the lanes past the step's rows are not stored).
      if (sg.zeros_some) out[k] = V::blendv(out[k], V(0), sg.zero[k]);
    }
    T* gc = g + c * l.positions;
    if (sg.keeps_some) {  // rows the backward leaves as they are keep their gradient
      V old[2];
      load_step(static_cast<const T*>(gc), n, old);
      for (int k = 0; k < 2; ++k) out[k] = V::blendv(out[k], old[k], sg.keep[k]);
    }
    store_step(gc, n, out);
  }
  if constexpr (!kProb) {
    // The true class once more, in opmath, rounded once: its element minus target_coef (write_row_grad's
    // math::target_grad, on vectors).
    alignas(64) O target_grad[W];
    V t_grad[2];
    for (int k = 0; k < 2; ++k) {
      const V centred = sg.target_logit[k] - sg.shift[k];
      const V p = kFromExps ? coef[k] * math::exp_(centred) : coef[k] * math::exp_(centred - sg.log_sum[k]);
      const V element = kLinear ? p - sg.linear_coef[k] * sg.target_weight[k] : p;
      t_grad[k] = element - sg.target_coef[k];
    }
    store_lanes(target_grad, t_grad);
    for (int64_t i = 0; i < n; ++i) {
      if (sg.target[i] >= 0 && sg.write[i]) g[sg.target[i] * l.positions + i] = static_cast<T>(target_grad[i]);
    }
  }
}

template <class T, bool kProb, bool kLinear>
FT_XENT_FLATTEN CrossEntropySums forward_positions(const CrossEntropyLaunch& l, int64_t row_begin, int64_t row_end) {
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  constexpr int64_t W = StepIO<T>::kWidth;
  const math::XentHyper<O> h = xent_hyper<O>(l);
  const auto hv = broadcast(h);
  const V grad_scale(l.grad != nullptr ? math::mean_scale(O(1), *static_cast<const O*>(l.denominator)) : O(0));
  const int64_t C = l.classes, stride = l.positions;
  // The step in opmath, C vector pairs, contiguous: pass 1 copies it here, pass 2 reads it back (21 classes of fp32:
  // 2.7 KiB, in L1) and, when the gradient is wanted, leaves the exps in its place. Read again from the logits,
  // the classes of a step would contend for one cache set: they lie positions·itemsize apart, a power of two for
  // most images (512 x 512 fp32: 1 MiB, every class in the same L1 and L2 set).
  std::vector<O> step(static_cast<size_t>(C * W));
  // Probability rows' coefficients a (w·t'), read once from the targets in pass 2 and kept for the gradient.
  std::vector<O> coefs(kProb && l.grad != nullptr ? static_cast<size_t>(C * W) : 0);
  CrossEntropySums sums;
  StepGrad<T> sg;
  for (int64_t i = 0; i < W; ++i) {
    sg.write[i] = true;
    sg.target[i] = -1;
  }
  for (int k = 0; k < 2; ++k) sg.zero[k] = V(0) != V(0);  // probability rows all count
  alignas(64) O lane_shift[W], lane_log_sum[W], lane_loss[W], lane_z_loss[W];
  // A reduced loss's rows are summed in double per lane, the lanes in order at the end: a fixed order for a
  // given row range (so for any thread count, as the rows kernels), without a chain of dependent adds.
  alignas(64) double lane_sum[W] = {}, lane_z_sum[W] = {};
  O* row_lse = static_cast<O*>(l.lse);
  for_each_position_step<W>(l, row_begin, row_end, [&](int64_t r, int64_t offset, int64_t n) {
    const T* x = static_cast<const T*>(l.logits) + offset;
    V max[2], xv[2];
    load_step(x, n, max);
    store_lanes(step.data(), max);
    prefetch_step(x + kPrefetchSteps * W);
    for (int64_t c = 1; c < C; ++c) {
      prefetch_step(x + c * stride + kPrefetchSteps * W);
      load_step(x + c * stride, n, xv);
      store_lanes(step.data() + c * W, xv);
      for (int k = 0; k < 2; ++k) max[k] = at::vec::maximum(max[k], xv[k]);  // NaN-propagating
    }
    if constexpr (!kProb) gather_step_targets(l, r, n, step.data(), W, sg);
    V sum[2], dot[2], asum[2], a[2];
    for (int k = 0; k < 2; ++k) {
      sg.shift[k] = math::safe_shift(max[k]);
      sum[k] = dot[k] = asum[k] = V(0);
    }
    const bool keep_exps = l.grad != nullptr;
    for (int64_t c = 0; c < C; ++c) {
      O* xs = step.data() + c * W;
      load_lanes(xs, xv);
      if constexpr (kLinear) {
        step_coefficients<T, kProb>(l, offset, n, c, hv, a);
        if (!coefs.empty()) store_lanes(coefs.data() + c * W, a);
      }
      for (int k = 0; k < 2; ++k) {
        const V centred = xv[k] - sg.shift[k];
        const V e = math::exp_(centred);
        if (keep_exps) e.store(xs + k * V::size());
        sum[k] = sum[k] + e;
        if constexpr (kLinear) {
          dot[k] = dot[k] + a[k] * centred;  // no fused multiply-add: the same bits on every instruction set
          asum[k] = asum[k] + a[k];
        }
      }
    }
    // Each row's loss (math::index_row_loss / prob_row_loss, lane by lane) and z-loss.
    V loss[2], z_loss[2];
    for (int k = 0; k < 2; ++k) {
      sg.log_sum[k] = math::finish_log_sums(max[k], sum[k]);
      const V full = sg.shift[k] + sg.log_sum[k];
      z_loss[k] = V(h.lse_square_scale) * full * full;
      const V linear = asum[k] * sg.log_sum[k] - dot[k];  // math::linear_term
      if constexpr (kProb) {
        loss[k] = linear;
      } else {
        loss[k] = V(h.one_minus_smoothing) *
                  (sg.target_weight[k] * (sg.log_sum[k] - (sg.target_logit[k] - sg.shift[k])));
        if (h.smoothing) loss[k] = loss[k] + V(h.smoothing_over_classes) * linear;
      }
      if (h.lse_square_scale != O(0)) loss[k] = loss[k] + z_loss[k];
      if constexpr (!kProb) {
        loss[k] = V::blendv(loss[k], V(0), sg.zero[k]);
        z_loss[k] = V::blendv(z_loss[k], V(0), sg.zero[k]);
      }
    }
    store_lanes(lane_shift, sg.shift);
    store_lanes(lane_log_sum, sg.log_sum);
    store_lanes(lane_loss, loss);
    store_lanes(lane_z_loss, z_loss);
    for (int64_t i = 0; i < n; ++i) {
      row_lse[2 * (r + i)] = lane_shift[i];
      row_lse[2 * (r + i) + 1] = lane_log_sum[i];
    }
    if (l.row_loss == nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        lane_sum[i] += static_cast<double>(lane_loss[i]);
        lane_z_sum[i] += static_cast<double>(lane_z_loss[i]);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) store_row_loss<T>(l, r + i, lane_loss[i], lane_z_loss[i]);
    }
    if (l.grad == nullptr) return;
    const V scale[2] = {grad_scale, grad_scale};
    step_grad_constants<T, kProb>(h, scale, asum, sg);  // a probability row's target mass is its asum
    write_step_grad<T, kProb, kLinear, true>(l, offset, n, sg, hv, step.data(), coefs.data(), sum);
  });
  for (int64_t i = 0; i < W; ++i) {
    sums.loss += lane_sum[i];
    sums.z_loss += lane_z_sum[i];
  }
  return sums;
}

template <class T, bool kProb, bool kLinear>
FT_XENT_FLATTEN void backward_positions(const CrossEntropyLaunch& l, int64_t row_begin, int64_t row_end) {
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  constexpr int64_t W = StepIO<T>::kWidth;
  const math::XentHyper<O> h = xent_hyper<O>(l);
  const auto hv = broadcast(h);
  const O denominator = *static_cast<const O*>(l.denominator);
  const O* grad_loss = static_cast<const O*>(l.grad_loss);
  const O* saved = static_cast<const O*>(l.lse_in);
  const int64_t C = l.classes;
  // The step's logits (and probability rows' coefficients) in opmath, read once from memory in a pass of their own
  // (as forward_positions explains).
  std::vector<O> step(static_cast<size_t>(C * W));
  std::vector<O> coefs(kProb ? static_cast<size_t>(C * W) : 0);
  StepGrad<T> sg;
  alignas(64) O lane_shift[W], lane_log_sum[W], lane_scale[W], lane_keep[W];
  for_each_position_step<W>(l, row_begin, row_end, [&](int64_t r, int64_t offset, int64_t n) {
    bool any = false;
    sg.keeps_some = false;
    for (int64_t i = 0; i < W; ++i) {
      const O row_grad_loss = i < n ? grad_loss[(r + i) * l.grad_loss_stride] : O(0);
      sg.write[i] = i < n && !(l.keep_unit_rows && row_grad_loss == O(1));
      any = any || sg.write[i];
      sg.keeps_some = sg.keeps_some || (i < n && !sg.write[i]);
      lane_keep[i] = sg.write[i] ? O(0) : O(1);
      // grad_loss / denominator in opmath, applied before the element's one rounding (see backward_rows_typed).
      lane_scale[i] = math::mean_scale(row_grad_loss, denominator);
      lane_shift[i] = i < n ? saved[2 * (r + i)] : O(0);
      lane_log_sum[i] = i < n ? saved[2 * (r + i) + 1] : O(0);
    }
    if (!any) return;
    load_lanes(lane_shift, sg.shift);
    load_lanes(lane_log_sum, sg.log_sum);
    load_lanes(lane_keep, sg.keep);
    V scale[2], mass[2] = {V(0), V(0)};
    load_lanes(lane_scale, scale);
    for (int k = 0; k < 2; ++k) sg.keep[k] = sg.keep[k] != V(0);
    const T* x = static_cast<const T*>(l.logits) + offset;
    for (int64_t c = 0; c < C; ++c) {
      V xv[2];
      prefetch_step(x + c * l.positions + kPrefetchSteps * W);
      load_step(x + c * l.positions, n, xv);
      store_lanes(step.data() + c * W, xv);
    }
    if constexpr (kProb) {
      // A_r = Σ w_c·t'_c per lane: one pass over the step's targets.
      V a[2];
      for (int64_t c = 0; c < C; ++c) {
        step_coefficients<T, true>(l, offset, n, c, hv, a);
        store_lanes(coefs.data() + c * W, a);
        for (int k = 0; k < 2; ++k) mass[k] = mass[k] + a[k];
      }
      for (int k = 0; k < 2; ++k) sg.zero[k] = V(0) != V(0);  // every probability row counts
    } else {
      gather_step_targets(l, r, n, step.data(), W, sg);
    }
    step_grad_constants<T, kProb>(h, scale, mass, sg);
    write_step_grad<T, kProb, kLinear, false>(l, offset, n, sg, hv, step.data(), coefs.data(), mass);
  });
}

// The forward of rows [row_begin, row_end): each row is read once into its state, then (when l.grad is
// set) read again while still in cache to write its gradient for grad_loss = 1. Returns the sums of the
// row losses, added in row order.
template <class T, bool kProb, bool kLinear>
FT_XENT_FLATTEN CrossEntropySums forward_rows_typed(const CrossEntropyLaunch& l, int64_t row_begin, int64_t row_end) {
  if (l.positions > 0) return forward_positions<T, kProb, kLinear>(l, row_begin, row_end);
  if constexpr (!kProb && !kLinear) {
    if (l.classes <= kGroupClasses) return forward_row_groups<T>(l, row_begin, row_end);
  }
  using O = XentOpmath<T>;
  const math::XentHyper<O> h = xent_hyper<O>(l);
  const auto hv = broadcast(h);
  const O* weight = static_cast<const O*>(l.weight);
  const O grad_scale = l.grad != nullptr ? math::mean_scale(O(1), *static_cast<const O*>(l.denominator)) : O(0);
  const bool short_rows = l.classes <= kBlockSteps * StepIO<T>::kWidth;
  CrossEntropySums sums;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(l.logits) + r * l.logits_row_stride;
    const T* target_row = kProb ? static_cast<const T*>(l.target) + r * l.target_row_stride : nullptr;
    const math::RowState<O> st = short_rows ? scan_short_row<T, kProb, kLinear>(l, x, target_row, hv)
                                            : scan_row<T, kProb, kLinear>(l, x, target_row, hv);
    const math::RowLse<O> lse = math::finish_row(st);
    O loss = 0, z_loss = 0, x_t = 0;
    int64_t t = -1;
    bool ignored = false;
    if constexpr (kProb) {
      loss = math::prob_row_loss(st, lse, h);
    } else {
      t = read_index(l, r);
      ignored = t == l.ignore_index;
      if (!ignored) {
        x_t = static_cast<O>(x[t]);
        loss = math::index_row_loss(st, lse, x_t, weight != nullptr ? weight[t] : O(1), h);
      }
    }
    if (!ignored) z_loss = math::z_loss(lse, h);
    store_row_results<T>(l, r, lse, loss, z_loss, sums);
    if (l.grad != nullptr) {
      T* g = static_cast<T*>(l.grad) + r * l.grad_row_stride;
      if (ignored) {
        std::memset(static_cast<void*>(g), 0, l.classes * sizeof(T));
      } else {
        // The forward's A_r (st.asum) is the probability rows' target mass.
        write_row_grad<T, kProb, kLinear>(l, x, g, target_row, t, x_t, lse, grad_scale, st.asum, h, hv);
      }
    }
  }
  return sums;
}

template <class T, bool kProb, bool kLinear>
FT_XENT_FLATTEN void backward_rows_typed(const CrossEntropyLaunch& l, int64_t row_begin, int64_t row_end) {
  if (l.positions > 0) return backward_positions<T, kProb, kLinear>(l, row_begin, row_end);
  using O = XentOpmath<T>;
  using V = at::vec::Vectorized<O>;
  using IO = StepIO<T>;
  const math::XentHyper<O> h = xent_hyper<O>(l);
  const auto hv = broadcast(h);
  const int64_t C = l.classes;
  const O denominator = *static_cast<const O*>(l.denominator);
  const O* grad_loss = static_cast<const O*>(l.grad_loss);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const O row_grad_loss = grad_loss[r * l.grad_loss_stride];
    if (l.keep_unit_rows && row_grad_loss == O(1)) continue;
    const T* x = static_cast<const T*>(l.logits) + r * l.logits_row_stride;
    T* g = static_cast<T*>(l.grad) + r * l.grad_row_stride;
    const T* target_row = kProb ? static_cast<const T*>(l.target) + r * l.target_row_stride : nullptr;
    const O* saved = static_cast<const O*>(l.lse_in) + 2 * r;
    const math::RowLse<O> lse{saved[0], saved[1]};
    // grad_loss / denominator in opmath, applied before the element's one rounding: under loss scaling
    // (grad_loss = 2^15, say) fp16's (p - y)/N would underflow if it were rounded first and scaled after.
    const O scale = math::mean_scale(row_grad_loss, denominator);
    int64_t t = -1;
    O x_t = 0, target_mass = 0;  // x_t is read before the row is written: the in-place backward writes over the logits
    if constexpr (kProb) {
      // A_r = Σ w_j·t'_j: one pass over the target row (the forward's asum, not saved to keep the saved state
      // at one value per row).
      V mass(0), lo, hi;
      for (int64_t j = 0; j < C; j += IO::kWidth) {
        load_coefficients<T, true>(l, target_row, j, std::min<int64_t>(IO::kWidth, C - j), hv, lo, hi);
        mass = mass + lo + hi;
      }
      target_mass = at::vec::vec_reduce_all<O>([](const V& p, const V& q) { return p + q; }, mass);
    } else {
      t = read_index(l, r);
      if (t == l.ignore_index) {
        std::memset(static_cast<void*>(g), 0, C * sizeof(T));
        continue;
      }
      x_t = static_cast<O>(x[t]);
    }
    write_row_grad<T, kProb, kLinear>(l, x, g, target_row, t, x_t, lse, scale, target_mass, h, hv);
  }
}

// Dispatch on dtype and on the row kind: class index without a linear term, class index with label
// smoothing, probabilities. The caller guarantees l.weight is set whenever a linear term is needed.
template <template <class, bool, bool> class Rows>
FT_INLINE auto dispatch_xent(const CrossEntropyLaunch& l, int64_t b, int64_t e) {
  const auto by_kind = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (l.target_is_prob) return Rows<T, true, true>::run(l, b, e);
    if (l.label_smoothing > 0.0) return Rows<T, false, true>::run(l, b, e);
    return Rows<T, false, false>::run(l, b, e);
  };
  switch (l.dtype) {
    case ScalarKind::Float: return by_kind(float{});
    case ScalarKind::Double: return by_kind(double{});
    case ScalarKind::BFloat16: return by_kind(c10::BFloat16{});
    case ScalarKind::Half: break;
  }
  return by_kind(c10::Half{});
}

template <class T, bool kProb, bool kLinear>
struct ForwardRows {
  static CrossEntropySums run(const CrossEntropyLaunch& l, int64_t b, int64_t e) {
    return forward_rows_typed<T, kProb, kLinear>(l, b, e);
  }
};
template <class T, bool kProb, bool kLinear>
struct BackwardRows {
  static void run(const CrossEntropyLaunch& l, int64_t b, int64_t e) { backward_rows_typed<T, kProb, kLinear>(l, b, e); }
};

inline CrossEntropySums cross_entropy_forward_rows(const CrossEntropyLaunch& l, int64_t row_begin, int64_t row_end) {
  return dispatch_xent<ForwardRows>(l, row_begin, row_end);
}
inline void cross_entropy_backward_rows(const CrossEntropyLaunch& l, int64_t row_begin, int64_t row_end) {
  dispatch_xent<BackwardRows>(l, row_begin, row_end);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_train
