// Cross-entropy math shared by the CPU kernels (instantiated with float/double and with
// at::vec::Vectorized lanes) and the CUDA kernels (float/double). Torch-free on purpose.
//
// A row of logits x (C classes) is summarised in one pass by a running state per lane / thread:
//   max   m = max_c x_c                     (the shift; -inf until a finite or +inf value is seen)
//   sum   s = Σ_c exp(x_c - m)              (so log-sum-exp = m + log s)
//   dot   d = Σ_c a_c · (x_c - m)           (only when a linear term is needed, see below)
//   asum  A = Σ_c a_c
// where a_c is the coefficient of x_c in the loss's linear part: w_c for label smoothing of class-index
// targets, w_c · t'_c for probability targets (t' = (1-ε)·t + ε/C). Keeping d relative to the running max
// instead of accumulating Σ a·x directly avoids the cancellation of A·lse − Σ a·x when the logits share
// a large offset. States combine associatively (lanes, threads, warps, blocks, vocabulary splits).
//
// Loss of one row (torch's F.cross_entropy, aten/src/ATen/native/LossNLL.cpp, incl. label smoothing):
//   class index t:  (1-ε)·w_t·(lse - x_t) + (ε/C)·Σ_c w_c·(lse - x_c) + z·lse²
//   probabilities:  Σ_c w_c·t'_c·(lse - x_c) + z·lse²
// with Σ_c a_c·(lse - x_c) = A·(lse - m) - d. The z-loss term z·lse² (PaLM, Chowdhery et al. 2022, §5) is
// added to every row that is not ignored, unweighted, and reduced with the loss.
//
// Gradient (∂loss_r/∂x_j, scaled by g_r = grad_out_r / denominator; 0 for ignored rows), p_j = exp(x_j - lse):
//   class index t:  g·[(A_r + 2z·lse)·p_j − (ε/C)·w_j − (1-ε)·w_t·[j = t]],  A_r = (1-ε)·w_t + (ε/C)·Σ_c w_c
//   probabilities:  g·[(A_r + 2z·lse)·p_j − w_j·t'_j],                      A_r = Σ_c w_c·t'_c
#pragma once

#include <cmath>
#include <limits>

#include "fused_train/macros.h"

namespace fused_train {
namespace math {

// Scalar overloads; the CPU kernels call the same functions on at::vec::Vectorized, whose members the
// templates below forward to (exp_u20: 20-ulp vector exp, ~1e-6 relative; within fp32 test tolerance).
// On the GPU a float exp is 2^(x·log2 e) on the special-function unit: 2 instructions where expf takes 9,
// which left the bf16 forward instruction-bound (ptxas, sm_90). Its error is ex2.approx's 2 ulps plus the
// product's rounding, |x|·2^-24 relative: under 8 ulps for the |x| < 10 that carry a row's sum, and the
// gradient's p = exp(x - lse) as accurate; results below 2^-126 (x < -87) are flushed to 0.
FT_HOST_DEVICE FT_INLINE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#else
  return ::expf(x);
#endif
}
FT_HOST_DEVICE FT_INLINE double exp_(double x) { return ::exp(x); }
template <class V>
FT_INLINE V exp_(const V& x) {
  return x.exp_u20();
}
FT_HOST_DEVICE FT_INLINE float log_(float x) { return ::logf(x); }
FT_HOST_DEVICE FT_INLINE double log_(double x) { return ::log(x); }
template <class V>
FT_INLINE V log_(const V& x) {
  return x.log();  // 1-ulp vector log (Sleef's u10), as glibc's logf
}

// NaN-dropping max, one instruction on the GPU (accumulate_run says why dropping NaN is safe there).
FT_HOST_DEVICE FT_INLINE float fmax_(float a, float b) { return ::fmaxf(a, b); }
FT_HOST_DEVICE FT_INLINE double fmax_(double a, double b) { return ::fmax(a, b); }

// The value a running max is subtracted as: 0 while the max is still -inf, so that a lane that has only
// seen -inf logits yields exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
FT_HOST_DEVICE FT_INLINE float safe_shift(float m) { return m == -INFINITY ? 0.0f : m; }
FT_HOST_DEVICE FT_INLINE double safe_shift(double m) { return m == -static_cast<double>(INFINITY) ? 0.0 : m; }
template <class V>
FT_INLINE V safe_shift(const V& m) {
  return V::blendv(m, V(0), m == V(-std::numeric_limits<typename V::value_type>::infinity()));
}

// Running summary of part of a row (see the top of this file). Scalar type T: float or double.
template <class T>
struct RowState {
  T max;
  T sum;
  T dot;
  T asum;
};

template <class T>
FT_HOST_DEVICE FT_INLINE RowState<T> empty_row_state() {
  return {-static_cast<T>(INFINITY), T(0), T(0), T(0)};
}

// Merges two partial states (associative and commutative up to rounding). A state whose max is -inf has
// sum 0, and its dot is finite only if it saw no logits at all; rescaling uses safe_shift so neither
// produces NaN from -inf - (-inf).
template <class T>
FT_HOST_DEVICE FT_INLINE RowState<T> combine(const RowState<T>& a, const RowState<T>& b) {
  const T m = a.max > b.max ? a.max : b.max;
  const T shift = safe_shift(m);
  const T sa = safe_shift(a.max), sb = safe_shift(b.max);
  RowState<T> r;
  r.max = (a.max != a.max || b.max != b.max) ? a.max + b.max : m;  // NaN logits stay visible
  // The raw max, not its safe shift, scales the sum: exp(-inf - shift) = 0 for a side that saw only -inf
  // (a shift of 0 there would give 0 · exp(-shift), which overflows to 0 · inf for shift < -88).
  r.sum = a.sum * exp_(a.max - shift) + b.sum * exp_(b.max - shift);
  // d is relative to each side's shift; move both to the new one: Σ a·(x - new) = d + A·(old - new).
  r.dot = (a.asum == T(0) ? a.dot : a.dot + a.asum * (sa - shift)) +
          (b.asum == T(0) ? b.dot : b.dot + b.asum * (sb - shift));
  r.asum = a.asum + b.asum;
  return r;
}

// Adds a run of K consecutive logits x (linear coefficients a, read only when Linear) to a scalar state: one
// comparison with the running max per run, then one exp per element. Used by the CUDA threads, K = 1 at a row's
// unaligned edges and 16 bytes' worth in between. The run's max drops NaN (fmax), which costs one instruction
// per element instead of three: a NaN logit still poisons the state, through exp(NaN) in the sum (and
// a·NaN in the dot), and finish_row's log of it makes the row's loss and gradient NaN, as in torch.
template <bool Linear, int K, class T>
FT_HOST_DEVICE FT_INLINE void accumulate_run(RowState<T>& st, const T* x, const T* a) {
  T run_max = x[0];
  for (int k = 1; k < K; ++k) run_max = fmax_(run_max, x[k]);
  if (run_max > st.max) {
    // Rescale by the raw old max (exp(-inf - shift) = 0 for a state that saw only -inf), as combine does.
    const T old_shift = safe_shift(st.max), shift = safe_shift(run_max);
    st.sum *= exp_(st.max - shift);
    if (Linear && st.asum != T(0)) st.dot += st.asum * (old_shift - shift);
    st.max = run_max;
  }
  const T shift = safe_shift(st.max);
  T sum = 0;
  for (int k = 0; k < K; ++k) sum += exp_(x[k] - shift);
  st.sum += sum;
  if (Linear) {
    for (int k = 0; k < K; ++k) {
      st.dot += a[k] * (x[k] - shift);
      st.asum += a[k];
    }
  }
}

// A row's log-sum-exp kept in two parts, lse = shift + log_sum, with shift the (safe) max logit. This is
// what the forward saves for the backward: softmax_j = exp((x_j - shift) - log_sum) as torch's log_softmax
// computes it, exact to an ulp of the result even when the logits are ~1e4, where a single fp32 lse would
// carry ulp(1e4) ≈ 1e-3 of absolute error into every probability.
template <class T>
struct RowLse {
  T shift;
  T log_sum;
};

// A +inf logit makes its row's loss and gradient NaN, as in torch (where exp(x - max) is NaN for it): the NaN
// log_sum carries into both (the gradient's coefficients multiply it, and 0 · NaN is NaN).
template <class T>
FT_HOST_DEVICE FT_INLINE RowLse<T> finish_row(const RowState<T>& st) {
  return {safe_shift(st.max), st.max == static_cast<T>(INFINITY) ? static_cast<T>(NAN) : log_(st.sum)};
}
// finish_row's log_sum for a vector of rows, one per lane (max and sum as in RowState).
template <class V>
FT_INLINE V finish_log_sums(const V& max, const V& sum) {
  using T = typename V::value_type;
  return V::blendv(log_(sum), V(std::numeric_limits<T>::quiet_NaN()), max == V(std::numeric_limits<T>::infinity()));
}

// Per-call constants of the loss, in opmath T.
template <class T>
struct XentHyper {
  T one_minus_smoothing;    // 1 - ε
  T smoothing_over_classes; // ε / C
  T class_weight_sum;       // Σ_c w_c (C when unweighted)
  T lse_square_scale;       // z
  bool smoothing;           // ε > 0: the linear term over all classes is needed
};

// Σ_c a_c·(lse - x_c) from a finished state (its dot is relative to lse.shift).
template <class T>
FT_HOST_DEVICE FT_INLINE T linear_term(const RowState<T>& st, const RowLse<T>& lse) {
  return st.asum * lse.log_sum - st.dot;
}

// z·lse², the z-loss of a row that is not ignored.
template <class T>
FT_HOST_DEVICE FT_INLINE T z_loss(const RowLse<T>& lse, const XentHyper<T>& h) {
  const T full = lse.shift + lse.log_sum;
  return h.lse_square_scale * full * full;
}

// Loss of a row with class-index target t (weight w_t), not ignored.
template <class T>
FT_HOST_DEVICE FT_INLINE T index_row_loss(const RowState<T>& st, const RowLse<T>& lse, T target_logit,
                                          T target_weight, const XentHyper<T>& h) {
  // Same grouping as torch: (1-ε)·nll + (ε/C)·smooth, with -log_softmax_t = log_sum - (x_t - shift).
  T loss = h.one_minus_smoothing * (target_weight * (lse.log_sum - (target_logit - lse.shift)));
  if (h.smoothing) loss += h.smoothing_over_classes * linear_term(st, lse);
  if (h.lse_square_scale != T(0)) loss += z_loss(lse, h);
  return loss;
}

// Loss of a row with probability targets (its linear term was accumulated with a_c = w_c·t'_c).
template <class T>
FT_HOST_DEVICE FT_INLINE T prob_row_loss(const RowState<T>& st, const RowLse<T>& lse, const XentHyper<T>& h) {
  T loss = linear_term(st, lse);
  if (h.lse_square_scale != T(0)) loss += z_loss(lse, h);
  return loss;
}

// Linear coefficient a_c of a probability target t_c with class weight w_c: w_c·((1-ε)·t_c + ε/C).
template <class T>
FT_HOST_DEVICE FT_INLINE T smoothed_target(T target_prob, const XentHyper<T>& h) {
  return h.smoothing ? h.one_minus_smoothing * target_prob + h.smoothing_over_classes : target_prob;
}

// Row constants of the gradient: grad_j = softmax_coef·p_j − linear_coef·a_j [− target_coef at j = t].
template <class T>
struct RowGrad {
  T shift, log_sum;
  T softmax_coef;   // g·(A_r + 2z·lse)
  T linear_coef;    // g·ε/C (class index) or g (probabilities): multiplies w_j resp. w_j·t'_j
  T target_coef;    // g·(1-ε)·w_t (class index only)
};

// A row's gradient scale g_r = grad_out_r / denominator. NaN for a denominator of 0 (a mean over no weight,
// 0/0 in torch's NLL backward): every row that is not ignored gets a NaN gradient, as in torch, whatever its
// terms (the unweighted z-loss's would give ±inf).
template <class T>
FT_HOST_DEVICE FT_INLINE T mean_scale(T grad_out, T denominator) {
  return denominator != T(0) ? grad_out / denominator : std::numeric_limits<T>::quiet_NaN();
}

// scale: grad_out_r / denominator (mean_scale), already 0 for an ignored row.
template <class T>
FT_HOST_DEVICE FT_INLINE RowGrad<T> index_row_grad(T scale, const RowLse<T>& lse, T target_weight,
                                                   const XentHyper<T>& h) {
  const T a = h.one_minus_smoothing * target_weight + h.smoothing_over_classes * h.class_weight_sum;
  const T full = lse.shift + lse.log_sum;
  return {lse.shift, lse.log_sum, scale * (a + T(2) * h.lse_square_scale * full), scale * h.smoothing_over_classes,
          scale * h.one_minus_smoothing * target_weight};
}

// target_mass: A_r = Σ_c w_c·t'_c of the row.
template <class T>
FT_HOST_DEVICE FT_INLINE RowGrad<T> prob_row_grad(T scale, const RowLse<T>& lse, T target_mass,
                                                  const XentHyper<T>& h) {
  const T full = lse.shift + lse.log_sum;
  return {lse.shift, lse.log_sum, scale * (target_mass + T(2) * h.lse_square_scale * full), scale, T(0)};
}

// One gradient element, before the true-class term: softmax_coef·exp((x - shift) - log_sum) − linear_coef·a.
// V: scalar or vector; a is w_j (class index with smoothing), w_j·t'_j (probabilities) or 0.
template <class V>
FT_HOST_DEVICE FT_INLINE V grad_element(const V& x, const V& a, const V& shift, const V& log_sum,
                                        const V& softmax_coef, const V& linear_coef) {
  return softmax_coef * exp_((x - shift) - log_sum) - linear_coef * a;
}

// The true class's gradient, in opmath before any rounding: its element value minus (1-ε)·w_t·g.
template <class T>
FT_HOST_DEVICE FT_INLINE T target_grad(T x_t, T a_t, const RowGrad<T>& r) {
  return grad_element<T>(x_t, a_t, r.shift, r.log_sum, r.softmax_coef, r.linear_coef) - r.target_coef;
}

}  // namespace math
}  // namespace fused_train
