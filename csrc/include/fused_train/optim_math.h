// Per-element update math of every fused_train optimizer, shared by the CPU kernels (instantiated with
// float/double and with at::vec::Vectorized) and the CUDA kernels (float/double). Torch-free on purpose:
// tests/cpp checks it without libtorch.
//
// Each update follows the operation order of torch.optim's single-tensor implementations (torch 2.14,
// torch/optim/{sgd,adam,rmsprop}.py), so parity tests can be tight. V is the math type ("opmath"):
// float for fp32/bf16/fp16 params, double for fp64. Hyperparameters arrive already converted to V.
#pragma once

#include "fused_train/macros.h"

namespace fused_train {
namespace math {

// torch.lerp's formula (ATen/native/Lerp.h): exact at both ends, stable for small and large weights.
template <class V>
FT_HOST_DEVICE FT_INLINE V lerp_small_weight(const V& self, const V& end, const V& weight) {
  return self + weight * (end - self);
}
template <class V>
FT_HOST_DEVICE FT_INLINE V lerp_large_weight(const V& self, const V& end, const V& one_minus_weight) {
  return end - (end - self) * one_minus_weight;
}

// ---------------------------------------------------------------------------------------------------
// SGD (torch.optim.SGD): d = ±g + wd·p;  buf = d (first step) or μ·buf + (1-τ)·d;
// d = d + μ·buf (Nesterov) or buf;  p = p - lr·d.
template <class V>
struct SgdHyper {
  V lr, momentum, one_minus_dampening, weight_decay;
  bool has_weight_decay, has_momentum, nesterov, maximize, first_step;
  // The same hyperparameters in another math type (the CPU kernels' at::vec::Vectorized broadcast).
  template <class W>
  SgdHyper<W> as() const {
    return {W(lr), W(momentum), W(one_minus_dampening), W(weight_decay), has_weight_decay, has_momentum, nesterov,
            maximize, first_step};
  }
};

// Built from torch's (double) hyperparameters, identically for the CPU and CUDA kernels.
template <class V>
FT_HOST_DEVICE FT_INLINE SgdHyper<V> make_sgd_hyper(double lr, double momentum, double dampening,
                                                    double weight_decay, bool nesterov, bool maximize,
                                                    bool first_step) {
  return {V(lr), V(momentum), V(1.0 - dampening), V(weight_decay), weight_decay != 0.0, momentum != 0.0,
          nesterov, maximize, first_step};
}

template <class V>
FT_HOST_DEVICE FT_INLINE void sgd_update(V& param, V grad, V* momentum_buf, const SgdHyper<V>& h) {
  if (h.maximize) grad = V(0) - grad;
  if (h.has_weight_decay) grad = grad + h.weight_decay * param;
  if (h.has_momentum) {
    V buf = h.first_step ? grad : (*momentum_buf) * h.momentum + h.one_minus_dampening * grad;
    *momentum_buf = buf;
    grad = h.nesterov ? grad + h.momentum * buf : buf;
  }
  param = param - h.lr * grad;
}

// ---------------------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam, decoupled_weight_decay for AdamW; Kingma & Ba 2015, Loshchilov &
// Hutter 2019). step_size = lr / (1 - β1^t) and bc2_sqrt = sqrt(1 - β2^t) come per tensor from
// adam_bias_correction below.
template <class V>
struct AdamHyper {
  V beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, decay_factor, eps;
  bool has_weight_decay, decoupled_weight_decay, amsgrad, maximize, lerp_weight_small;
  template <class W>
  AdamHyper<W> as() const {
    return {W(beta1),        W(one_minus_beta1),     W(beta2), W(one_minus_beta2), W(weight_decay),
            W(decay_factor), W(eps),                 has_weight_decay, decoupled_weight_decay, amsgrad,
            maximize,        lerp_weight_small};
  }
};

// decay_factor = 1 - lr·wd, as torch's `param.mul_(1 - lr * weight_decay)` computes it in double.
template <class V>
FT_HOST_DEVICE FT_INLINE AdamHyper<V> make_adam_hyper(double lr, double beta1, double beta2, double weight_decay,
                                                      double eps, bool amsgrad, bool maximize,
                                                      bool decoupled_weight_decay) {
  return {V(beta1),
          V(1.0 - beta1),
          V(beta2),
          V(1.0 - beta2),
          V(weight_decay),
          V(1.0 - lr * weight_decay),
          V(eps),
          weight_decay != 0.0,
          decoupled_weight_decay,
          amsgrad,
          maximize,
          (1.0 - beta1) < 0.5};
}

template <class V>
FT_HOST_DEVICE FT_INLINE void adam_update(V& param, V grad, V& exp_avg, V& exp_avg_sq, V* max_exp_avg_sq,
                                          const V& neg_step_size, const V& bc2_sqrt,
                                          const AdamHyper<V>& h) {
  if (h.maximize) grad = V(0) - grad;
  if (h.has_weight_decay) {
    if (h.decoupled_weight_decay) {
      param = param * h.decay_factor;  // decay_factor = 1 - lr·wd
    } else {
      grad = grad + h.weight_decay * param;
    }
  }
  // exp_avg.lerp_(grad, 1 - β1); torch.lerp picks its formula by the weight.
  exp_avg = h.lerp_weight_small ? lerp_small_weight(exp_avg, grad, h.one_minus_beta1)
                                : lerp_large_weight(exp_avg, grad, h.beta1);
  exp_avg_sq = exp_avg_sq * h.beta2 + h.one_minus_beta2 * grad * grad;
  V second = exp_avg_sq;
  if (h.amsgrad) {
    *max_exp_avg_sq = max_(*max_exp_avg_sq, exp_avg_sq);
    second = *max_exp_avg_sq;
  }
  const V denom = sqrt_(second) / bc2_sqrt + h.eps;
  param = param + neg_step_size * exp_avg / denom;
}

// Bias corrections in double, as torch computes them in Python floats; t is the step after increment.
struct AdamStepScalars {
  double neg_step_size;
  double bc2_sqrt;
};
FT_HOST_DEVICE FT_INLINE AdamStepScalars adam_bias_correction(double lr, double beta1, double beta2,
                                                             double t) {
  const double bias_correction1 = 1.0 - ::pow(beta1, t);
  const double bias_correction2 = 1.0 - ::pow(beta2, t);
  return {-(lr / bias_correction1), ::sqrt(bias_correction2)};
}

// ---------------------------------------------------------------------------------------------------
// RMSprop (torch.optim.RMSprop; Hinton's lecture 6e, Graves 2013 for the centered form):
// g = ±g + wd·p;  v = α·v + (1-α)·g²;  [ḡ = lerp(ḡ, g, 1-α);  v' = v - ḡ²];  avg = sqrt(v') + ε;
// buf = μ·buf + g/avg, p = p - lr·buf  (momentum)   or   p = p - lr·g/avg.
template <class V>
struct RmspropHyper {
  V lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  bool has_weight_decay, centered, has_momentum, maximize, lerp_weight_small;
  template <class W>
  RmspropHyper<W> as() const {
    return {W(lr),           W(alpha),         W(one_minus_alpha), W(eps),   W(weight_decay), W(momentum),
            has_weight_decay, centered,         has_momentum,       maximize, lerp_weight_small};
  }
};

template <class V>
FT_HOST_DEVICE FT_INLINE RmspropHyper<V> make_rmsprop_hyper(double lr, double alpha, double eps,
                                                            double weight_decay, double momentum, bool centered,
                                                            bool maximize) {
  return {V(lr),        V(alpha),     V(1.0 - alpha), V(eps),   V(weight_decay),     V(momentum),
          weight_decay != 0.0, centered, momentum > 0.0,  maximize, (1.0 - alpha) < 0.5};
}

template <class V>
FT_HOST_DEVICE FT_INLINE void rmsprop_update(V& param, V grad, V& square_avg, V* grad_avg, V* momentum_buf,
                                             const RmspropHyper<V>& h) {
  if (h.maximize) grad = V(0) - grad;
  if (h.has_weight_decay) grad = grad + h.weight_decay * param;
  square_avg = square_avg * h.alpha + h.one_minus_alpha * grad * grad;
  V avg;
  if (h.centered) {
    // grad_avg.lerp_(grad, 1 - α): the large-weight branch when α < 0.5.
    *grad_avg = h.lerp_weight_small ? lerp_small_weight(*grad_avg, grad, h.one_minus_alpha)
                                    : lerp_large_weight(*grad_avg, grad, h.alpha);
    avg = sqrt_(square_avg - (*grad_avg) * (*grad_avg));
  } else {
    avg = sqrt_(square_avg);
  }
  avg = avg + h.eps;
  if (h.has_momentum) {
    *momentum_buf = (*momentum_buf) * h.momentum + grad / avg;
    param = param - h.lr * (*momentum_buf);
  } else {
    param = param - h.lr * grad / avg;
  }
}

}  // namespace math
}  // namespace fused_train
