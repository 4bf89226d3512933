// Torch-free tests of the per-element update math (csrc/include/fused_train/optim_math.h), the code both the CPU
// and the CUDA kernels run. Expected values are worked out by hand from torch.optim's formulas (torch 2.14,
// torch/optim/{sgd,adam,rmsprop}.py), to 40 digits where they are not exact; multi-step sequences are compared
// with a textbook re-derivation (Kingma & Ba's m̂ / v̂ form of Adam), which orders the operations differently.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "check.h"
#include "fused_train/optim_math.h"

namespace math = fused_train::math;

namespace {

// Tight tolerances: the hand values are exact or rounded once, the math runs in the type under test.
template <class V>
constexpr double kRtol = std::is_same_v<V, float> ? 2e-7 : 1e-15;

template <class V>
math::SgdHyper<V> sgd(double lr, double momentum = 0, double dampening = 0, double weight_decay = 0,
                      bool nesterov = false, bool maximize = false, bool first_step = false) {
  return {.lr = V(lr), .momentum = V(momentum), .one_minus_dampening = V(1 - dampening),
          .weight_decay = V(weight_decay), .has_weight_decay = weight_decay != 0, .has_momentum = momentum != 0,
          .nesterov = nesterov, .maximize = maximize, .first_step = first_step};
}

template <class V>
void check_sgd() {
  {  // p - lr·g
    V p = 1, g = 0.5;
    math::sgd_update<V>(p, g, nullptr, sgd<V>(0.1));
    FT_CHECK_CLOSE(p, 0.95, kRtol<V>, 0);
  }
  {  // weight decay: d = g + wd·p = 0.5 + 0.1·2 = 0.7
    V p = 2;
    math::sgd_update<V>(p, V(0.5), nullptr, sgd<V>(0.1, 0, 0, 0.1));
    FT_CHECK_CLOSE(p, 2 - 0.1 * 0.7, kRtol<V>, 0);
  }
  {  // maximize negates the gradient before weight decay: d = -0.5 + 0.1·1 = -0.4
    V p = 1;
    math::sgd_update<V>(p, V(0.5), nullptr, sgd<V>(0.1, 0, 0, 0, false, true));
    FT_CHECK_CLOSE(p, 1.05, kRtol<V>, 0);
    p = 1;
    math::sgd_update<V>(p, V(0.5), nullptr, sgd<V>(0.1, 0, 0, 0.1, false, true));
    FT_CHECK_CLOSE(p, 1.04, kRtol<V>, 0);
  }
  {  // first step: the buffer is the gradient itself, no dampening (torch: buf = clone(d))
    V p = 1, buf = 123;
    math::sgd_update<V>(p, V(0.5), &buf, sgd<V>(0.1, 0.9, 0.5, 0, false, false, true));
    FT_CHECK_CLOSE(buf, 0.5, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 0.95, kRtol<V>, 0);
  }
  {  // later steps: buf = μ·buf + (1-τ)·g = 0.9·0.5 + 0.5·1 = 0.95
    V p = 1, buf = 0.5;
    math::sgd_update<V>(p, V(1), &buf, sgd<V>(0.1, 0.9, 0.5));
    FT_CHECK_CLOSE(buf, 0.95, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 1 - 0.095, kRtol<V>, 0);
  }
  {  // Nesterov: buf = 0.9·0.5 + 1 = 1.45; d = g + μ·buf = 1 + 1.305 = 2.305
    V p = 1, buf = 0.5;
    math::sgd_update<V>(p, V(1), &buf, sgd<V>(0.1, 0.9, 0, 0, true));
    FT_CHECK_CLOSE(buf, 1.45, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 1 - 0.2305, kRtol<V>, 0);
  }
  {  // Nesterov on the first step: buf = d = 0.5 + 0.1·2 (decay) = 0.7; d = 0.7 + 0.9·0.7 = 1.33
    V p = 2, buf = 0;
    math::sgd_update<V>(p, V(0.5), &buf, sgd<V>(0.1, 0.9, 0, 0.1, true, false, true));
    FT_CHECK_CLOSE(buf, 0.7, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 2 - 0.133, kRtol<V>, 0);
  }
}

FT_TEST(sgd_float) { check_sgd<float>(); }
FT_TEST(sgd_double) { check_sgd<double>(); }

// ---------------------------------------------------------------------------------------------------------------
FT_TEST(adam_bias_correction) {
  // -lr / (1 - β1^t) and sqrt(1 - β2^t) for lr = 1e-3, β = (0.9, 0.999). 1 - β^t cancels: double's rounding of β^t
  // grows by 1 / (1 - β^t), up to ~10x for β1 and ~1000x for β2, hence the tolerances.
  const double rtol1 = 1e-14, rtol2 = 1e-13;
  const auto t1 = math::adam_bias_correction(1e-3, 0.9, 0.999, 1);
  FT_CHECK_CLOSE(t1.neg_step_size, -0.01, rtol1, 0);
  FT_CHECK_CLOSE(t1.bc2_sqrt, 0.03162277660168379331998893544432718533720, rtol2, 0);
  const auto t2 = math::adam_bias_correction(1e-3, 0.9, 0.999, 2);
  FT_CHECK_CLOSE(t2.neg_step_size, -0.005263157894736842105263157894736842105263, rtol1, 0);
  FT_CHECK_CLOSE(t2.bc2_sqrt, 0.04471017781221631419961342300204768423152, rtol2, 0);
  const auto t10 = math::adam_bias_correction(1e-3, 0.9, 0.999, 10);
  FT_CHECK_CLOSE(t10.neg_step_size, -0.001535339932787629497906937012480737934190, rtol1, 0);
  FT_CHECK_CLOSE(t10.bc2_sqrt, 0.09977534660552069522915860220718464258716, rtol2, 0);
}

template <class V>
math::AdamHyper<V> adam(double lr, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8,
                        double weight_decay = 0, bool decoupled = false, bool amsgrad = false, bool maximize = false) {
  return {.beta1 = V(beta1), .one_minus_beta1 = V(1 - beta1), .beta2 = V(beta2), .one_minus_beta2 = V(1 - beta2),
          .weight_decay = V(weight_decay), .decay_factor = V(1 - lr * weight_decay), .eps = V(eps),
          .has_weight_decay = weight_decay != 0, .decoupled_weight_decay = decoupled, .amsgrad = amsgrad,
          .maximize = maximize, .lerp_weight_small = (1 - beta1) < 0.5};
}

template <class V>
void adam_step(V& p, V g, V& m, V& v, V* vmax, double lr, int t, const math::AdamHyper<V>& h, double beta1 = 0.9,
               double beta2 = 0.999) {
  const auto bc = math::adam_bias_correction(lr, beta1, beta2, t);
  math::adam_update<V>(p, g, m, v, vmax, V(bc.neg_step_size), V(bc.bc2_sqrt), h);
}

template <class V>
void check_adam() {
  {  // t = 1 from zero state, g = 0.5: m = 0.05, v = 2.5e-4, m̂ = 0.5, v̂ = 0.25; p = 1 - 1e-3·0.5/(0.5 + 1e-8)
    V p = 1, m = 0, v = 0;
    adam_step<V>(p, V(0.5), m, v, nullptr, 1e-3, 1, adam<V>(1e-3));
    FT_CHECK_CLOSE(m, 0.05, kRtol<V>, 0);
    FT_CHECK_CLOSE(v, 2.5e-4, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 0.9990000000199999996000000079999998400000, kRtol<V>, 0);
  }
  {  // maximize: the same step with -g moves the param up by the same amount
    V p = 1, m = 0, v = 0;
    adam_step<V>(p, V(-0.5), m, v, nullptr, 1e-3, 1, adam<V>(1e-3, 0.9, 0.999, 1e-8, 0, false, false, true));
    FT_CHECK_CLOSE(m, 0.05, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 0.9990000000199999996000000079999998400000, kRtol<V>, 0);
  }
  {  // L2 decay (Adam): g' = 0.5 + 0.01·1 = 0.51 enters both moments
    V p = 1, m = 0, v = 0;
    adam_step<V>(p, V(0.5), m, v, nullptr, 1e-3, 1, adam<V>(1e-3, 0.9, 0.999, 1e-8, 0.01));
    FT_CHECK_CLOSE(m, 0.051, kRtol<V>, 0);
    FT_CHECK_CLOSE(v, 0.001 * 0.51 * 0.51, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 0.9990000000196078427527873970041686861928, kRtol<V>, 0);
  }
  {  // decoupled decay (AdamW): p·(1 - lr·wd) first, the moments see the raw gradient
    V p = 1, m = 0, v = 0;
    adam_step<V>(p, V(0.5), m, v, nullptr, 1e-3, 1, adam<V>(1e-3, 0.9, 0.999, 1e-8, 0.01, true));
    FT_CHECK_CLOSE(m, 0.05, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 0.9989900000199999996000000079999998400000, kRtol<V>, 0);
  }
  {  // amsgrad keeps the larger second moment and divides by it
    V p = 1, m = 0, v = 0, vmax = 1;
    adam_step<V>(p, V(0.5), m, v, &vmax, 1e-3, 1, adam<V>(1e-3, 0.9, 0.999, 1e-8, 0, false, true));
    FT_CHECK_CLOSE(v, 2.5e-4, kRtol<V>, 0);
    FT_CHECK_CLOSE(vmax, 1, 0, 0);
    FT_CHECK_CLOSE(p, 0.9999841886117041581033384243934482522177, kRtol<V>, 0);
    V p2 = 1, m2 = 0, v2 = 0, vmax2 = 1e-5;  // smaller than the new v: replaced, so the step is the plain one
    adam_step<V>(p2, V(0.5), m2, v2, &vmax2, 1e-3, 1, adam<V>(1e-3, 0.9, 0.999, 1e-8, 0, false, true));
    FT_CHECK_CLOSE(vmax2, 2.5e-4, kRtol<V>, 0);
    FT_CHECK_CLOSE(p2, 0.9990000000199999996000000079999998400000, kRtol<V>, 0);
  }
  {  // amsgrad's maximum propagates NaN from either side, as torch.maximum does
    const V nan = std::numeric_limits<V>::quiet_NaN();
    FT_CHECK(std::isnan(math::max_(nan, V(1))));
    FT_CHECK(std::isnan(math::max_(V(1), nan)));
    FT_CHECK(math::max_(V(2), V(1)) == V(2) && math::max_(V(1), V(2)) == V(2));
  }
  {  // exp_avg.lerp_(g, 1-β1): both of torch.lerp's formulas give m + (1-β1)·(g - m)
    V p = 1, m = 1, v = 0;
    adam_step<V>(p, V(3), m, v, nullptr, 1e-3, 1, adam<V>(1e-3, 0.9), 0.9);  // weight 0.1: small-weight form
    FT_CHECK_CLOSE(m, 1.2, kRtol<V>, 0);
    p = 1, m = 1, v = 0;
    adam_step<V>(p, V(3), m, v, nullptr, 1e-3, 1, adam<V>(1e-3, 0.3), 0.3);  // weight 0.7: large-weight form
    FT_CHECK_CLOSE(m, 2.4, kRtol<V>, 0);
  }
}

FT_TEST(adam_float) { check_adam<float>(); }
FT_TEST(adam_double) { check_adam<double>(); }

// Ten steps against Kingma & Ba's algorithm as written in the paper (with L2 or decoupled decay, amsgrad).
FT_TEST(adam_matches_textbook_over_ten_steps) {
  for (int variant = 0; variant < 4; ++variant) {
    const bool decoupled = variant & 1, amsgrad = variant & 2;
    const double lr = 1e-2, b1 = 0.9, b2 = 0.99, eps = 1e-8, wd = 0.05;
    double p = 0.7, m = 0, v = 0, vmax = 0;                          // optim_math.h
    double tp = 0.7, tm = 0, tv = 0, tvmax = 0;                      // textbook
    const auto h = adam<double>(lr, b1, b2, eps, wd, decoupled, amsgrad);
    for (int t = 1; t <= 10; ++t) {
      const double g = std::sin(1.7 * t) + 0.3;
      adam_step<double>(p, g, m, v, &vmax, lr, t, h, b1, b2);
      double tg = g;
      if (decoupled) {
        tp -= lr * wd * tp;
      } else {
        tg += wd * tp;
      }
      tm = b1 * tm + (1 - b1) * tg;
      tv = b2 * tv + (1 - b2) * tg * tg;
      tvmax = std::max(tvmax, tv);
      const double m_hat = tm / (1 - std::pow(b1, t));
      const double v_hat = (amsgrad ? tvmax : tv) / (1 - std::pow(b2, t));
      tp -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
    FT_CHECK_CLOSE(p, tp, 1e-12, 0);
    FT_CHECK_CLOSE(m, tm, 1e-12, 0);
    FT_CHECK_CLOSE(v, tv, 1e-12, 0);
    if (amsgrad) FT_CHECK_CLOSE(vmax, tvmax, 1e-12, 0);
  }
}

// ---------------------------------------------------------------------------------------------------------------
template <class V>
math::RmspropHyper<V> rmsprop(double lr, double alpha = 0.99, double eps = 1e-8, double weight_decay = 0,
                              double momentum = 0, bool centered = false, bool maximize = false) {
  return {.lr = V(lr), .alpha = V(alpha), .one_minus_alpha = V(1 - alpha), .eps = V(eps),
          .weight_decay = V(weight_decay), .momentum = V(momentum), .has_weight_decay = weight_decay != 0,
          .centered = centered, .has_momentum = momentum > 0, .maximize = maximize,
          .lerp_weight_small = (1 - alpha) < 0.5};
}

template <class V>
void check_rmsprop() {
  {  // v = 0.01·0.25 = 0.0025; p = 1 - 0.01·0.5/(0.05 + 1e-8)
    V p = 1, sq = 0, gavg = 0, buf = 0;
    math::rmsprop_update<V>(p, V(0.5), sq, &gavg, &buf, rmsprop<V>(0.01));
    FT_CHECK_CLOSE(sq, 0.0025, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 0.9000000199999960000007999998400000320000, kRtol<V>, 0);
  }
  {  // maximize: the step from g = -0.5 is the plain step from 0.5
    V p = 1, sq = 0, gavg = 0, buf = 0;
    math::rmsprop_update<V>(p, V(-0.5), sq, &gavg, &buf, rmsprop<V>(0.01, 0.99, 1e-8, 0, 0, false, true));
    FT_CHECK_CLOSE(p, 0.9000000199999960000007999998400000320000, kRtol<V>, 0);
  }
  {  // weight decay: g = 0.5 + 0.25·2 = 1, v = 0.01, avg = 0.1 + 1e-8
    V p = 2, sq = 0, gavg = 0, buf = 0;
    math::rmsprop_update<V>(p, V(0.5), sq, &gavg, &buf, rmsprop<V>(0.01, 0.99, 1e-8, 0.25));
    FT_CHECK_CLOSE(sq, 0.01, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 2 - 0.01 / (0.1 + 1e-8), kRtol<V>, 0);
  }
  {  // centered: ḡ = lerp(0, 0.5, 0.01) = 0.005, avg = sqrt(0.0025 - 0.005²) + 1e-8
    V p = 1, sq = 0, gavg = 0, buf = 0;
    math::rmsprop_update<V>(p, V(0.5), sq, &gavg, &buf, rmsprop<V>(0.01, 0.99, 1e-8, 0, 0, true));
    FT_CHECK_CLOSE(gavg, 0.005, kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 0.8994962386760949337132313754517453825628, 4 * kRtol<V>, 0);
  }
  {  // centered with momentum: buf = 0.9·0.2 + g/avg, p = 1 - lr·buf
    V p = 1, sq = 0, gavg = 0, buf = 0.2;
    math::rmsprop_update<V>(p, V(0.5), sq, &gavg, &buf, rmsprop<V>(0.01, 0.99, 1e-8, 0, 0.9, true));
    FT_CHECK_CLOSE(buf, 10.23037613239050662867686245482546174372, 4 * kRtol<V>, 0);
    FT_CHECK_CLOSE(p, 0.8976962386760949337132313754517453825628, 4 * kRtol<V>, 0);
  }
  {  // α < 0.5 takes torch.lerp's large-weight form for ḡ: lerp(1, 3, 0.7) = 2.4
    V p = 1, sq = 10, gavg = 1, buf = 0;
    math::rmsprop_update<V>(p, V(3), sq, &gavg, &buf, rmsprop<V>(0.01, 0.3, 1e-8, 0, 0, true));
    FT_CHECK_CLOSE(gavg, 2.4, kRtol<V>, 0);
    FT_CHECK_CLOSE(sq, 0.3 * 10 + 0.7 * 9, 2 * kRtol<V>, 0);
  }
}

FT_TEST(rmsprop_float) { check_rmsprop<float>(); }
FT_TEST(rmsprop_double) { check_rmsprop<double>(); }

}  // namespace

int main(int argc, char** argv) { return ft_test::run_tests(argc > 1 ? argv[1] : ""); }
