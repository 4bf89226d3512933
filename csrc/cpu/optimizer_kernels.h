// CPU optimizer kernels, written once against at::vec and compiled once per instruction set
// (isa/kernels_<isa>.cpp includes this file inside namespace fused_train::cpu::CPU_CAPABILITY).
//
// Work arrives as chunks (one element range of one parameter). Each chunk is walked in small tiles
// that stay in L1. Within a tile every update runs on whole Vectorized registers with a scalar tail:
// low-precision params and grads are loaded and widened to fp32 in registers, updated, and the param
// is rounded once on store, in the same loop (no widened copy of the tile: the conversions then run in
// the shadow of the update's divisions and square roots instead of in passes of their own). The
// gradient is zeroed (or written back unscaled) while its tile is still in cache.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_kernels.h"
#include "fused_train/optim_math.h"

namespace fused_train {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements per tile: params, grads and three states of a tile fit in a 32 KiB L1 several times over.
constexpr int64_t kTile = 512;

// Loads and stores for the vector body (A = VecAccess) and the scalar tail (A = ScalarAccess).
template <class O>
struct ScalarAccess {
  using V = O;
  static constexpr int64_t width = 1;
  static V load(const O* p) { return *p; }
  static void store(O* p, const V& v) { *p = v; }
};
template <class O>
struct VecAccess {
  using V = Vectorized<O>;
  static constexpr int64_t width = V::size();
  static V load(const O* p) { return V::loadu(p); }
  static void store(O* p, const V& v) { v.store(p); }
};

// Hyperparameters in both the scalar and the vector math type, built once per launch.
template <class O, template <class> class H>
struct HyperPair {
  H<O> scalar;
  H<Vectorized<O>> vector;
  template <class A>
  const H<typename A::V>& get() const {
    if constexpr (std::is_same_v<typename A::V, O>) {
      return scalar;
    } else {
      return vector;
    }
  }
};

// Per-op element functors: apply<A>(param, grad, i) updates element(s) i.. of one tile; param and grad
// are opmath values already loaded (and widened), the state pointers are already offset to the tile.
template <class O>
struct SgdTile {
  HyperPair<O, math::SgdHyper> h;
  O* momentum_buf;
  template <class A>
  void apply(typename A::V& param, const typename A::V& grad, int64_t i) const {
    using V = typename A::V;
    V buf = momentum_buf != nullptr ? A::load(momentum_buf + i) : V(0);
    math::sgd_update<V>(param, grad, &buf, h.template get<A>());
    if (momentum_buf != nullptr) A::store(momentum_buf + i, buf);
  }
};

template <class O>
struct AdamTile {
  HyperPair<O, math::AdamHyper> h;
  O *exp_avg, *exp_avg_sq, *max_exp_avg_sq;
  O neg_step_size, bc2_sqrt;
  template <class A>
  void apply(typename A::V& param, const typename A::V& grad, int64_t i) const {
    using V = typename A::V;
    V m = A::load(exp_avg + i), v = A::load(exp_avg_sq + i);
    const V nss(neg_step_size), bc2(bc2_sqrt);
    if (max_exp_avg_sq != nullptr) {
      V vmax = A::load(max_exp_avg_sq + i);
      math::adam_update<V>(param, grad, m, v, &vmax, nss, bc2, h.template get<A>());
      A::store(max_exp_avg_sq + i, vmax);
    } else {
      math::adam_update<V>(param, grad, m, v, nullptr, nss, bc2, h.template get<A>());
    }
    A::store(exp_avg + i, m);
    A::store(exp_avg_sq + i, v);
  }
};

template <class O>
struct RmspropTile {
  HyperPair<O, math::RmspropHyper> h;
  O *square_avg, *grad_avg, *momentum_buf;
  template <class A>
  void apply(typename A::V& param, const typename A::V& grad, int64_t i) const {
    using V = typename A::V;
    V sq = A::load(square_avg + i);
    V gavg = grad_avg != nullptr ? A::load(grad_avg + i) : V(0);
    V buf = momentum_buf != nullptr ? A::load(momentum_buf + i) : V(0);
    math::rmsprop_update<V>(param, grad, sq, &gavg, &buf, h.template get<A>());
    A::store(square_avg + i, sq);
    if (grad_avg != nullptr) A::store(grad_avg + i, gavg);
    if (momentum_buf != nullptr) A::store(momentum_buf + i, buf);
  }
};

// Walks one chunk tile by tile. T: storage type of param and grad; O: opmath. A low-precision vector
// (Vectorized<T>, twice as many elements as Vectorized<O>) widens to two opmath vectors, both are updated,
// and the pair narrows back (round to nearest even, as torch does) in one store.
template <class T, class O, class Tile>
void run_chunk(const OptimizerLaunch& l, const ParamSlot& slot, int64_t begin, int64_t end, Tile tile,
               O** state_ptrs, int n_state) {
  using OV = Vectorized<O>;
  using VA = VecAccess<O>;
  using SA = ScalarAccess<O>;
  T* param = static_cast<T*>(slot.param);
  T* grad = static_cast<T*>(slot.grad);
  // GradScaler's unscale, done here instead of in a separate pass over every gradient; the unscaled
  // gradient is written back when the step does not zero it.
  const bool unscale = l.has_grad_scale;
  const bool write_back_grad = l.has_grad_scale && !l.zero_grad;
  const O grad_scale = static_cast<O>(l.grad_scale);
  const OV vgrad_scale(grad_scale);
  O* state_base[3];
  for (int k = 0; k < n_state; ++k) state_base[k] = state_ptrs[k];

  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    T* p = param + t0;
    T* g = grad + t0;
    for (int k = 0; k < n_state; ++k) state_ptrs[k] = state_base[k] == nullptr ? nullptr : state_base[k] + t0;
    tile.bind(state_ptrs);

    int64_t i = 0;
    if constexpr (!std::is_same_v<T, O>) {
      using TV = Vectorized<T>;
      for (; i + TV::size() <= n; i += TV::size()) {
        auto [p0, p1] = at::vec::convert_to_float<T>(TV::loadu(p + i));
        auto [g0, g1] = at::vec::convert_to_float<T>(TV::loadu(g + i));
        if (unscale) {
          g0 = g0 / vgrad_scale;
          g1 = g1 / vgrad_scale;
        }
        tile.template apply<VA>(p0, g0, i);
        tile.template apply<VA>(p1, g1, i + OV::size());
        at::vec::convert_from_float<T>(p0, p1).store(p + i);
        if (write_back_grad) at::vec::convert_from_float<T>(g0, g1).store(g + i);
      }
    } else {
      for (; i + VA::width <= n; i += VA::width) {
        OV pv = OV::loadu(p + i), gv = OV::loadu(g + i);
        if (unscale) gv = gv / vgrad_scale;
        tile.template apply<VA>(pv, gv, i);
        pv.store(p + i);
        if (write_back_grad) gv.store(g + i);
      }
    }
    for (; i < n; ++i) {
      O pv = static_cast<O>(p[i]), gv = static_cast<O>(g[i]);
      if (unscale) gv = gv / grad_scale;
      tile.template apply<SA>(pv, gv, i);
      p[i] = static_cast<T>(pv);  // round to nearest even for bf16/fp16, as torch does
      if (write_back_grad) g[i] = static_cast<T>(gv);
    }
    if (l.zero_grad) std::memset(static_cast<void*>(g), 0, n * sizeof(T));
  }
}

template <class O>
struct SgdBound : SgdTile<O> {
  void bind(O** s) { this->momentum_buf = s[0]; }
};
template <class O>
struct AdamBound : AdamTile<O> {
  void bind(O** s) {
    this->exp_avg = s[0];
    this->exp_avg_sq = s[1];
    this->max_exp_avg_sq = s[2];
  }
};
template <class O>
struct RmspropBound : RmspropTile<O> {
  void bind(O** s) {
    this->square_avg = s[0];
    this->grad_avg = s[1];
    this->momentum_buf = s[2];
  }
};

template <class T, class O>
void optimizer_chunks_typed(const OptimizerLaunch& l, int64_t chunk_begin, int64_t chunk_end) {
  using VO = Vectorized<O>;
  // Hyperparameters once per call, in both widths.
  SgdBound<O> sgd{};
  AdamBound<O> adam{};
  RmspropBound<O> rms{};
  int n_state = 0;
  switch (l.kind) {
    case OptimizerKind::Sgd:
      sgd.h.scalar = math::make_sgd_hyper<O>(l.lr, l.momentum, l.dampening, l.weight_decay,
                                             l.nesterov, l.maximize, l.first_step);
      sgd.h.vector = sgd.h.scalar.template as<VO>();
      n_state = 1;
      break;
    case OptimizerKind::Adam:
      adam.h.scalar = math::make_adam_hyper<O>(l.lr, l.beta1, l.beta2, l.weight_decay, l.eps, l.amsgrad,
                                               l.maximize, l.decoupled_weight_decay);
      adam.h.vector = adam.h.scalar.template as<VO>();
      n_state = 3;
      break;
    case OptimizerKind::Rmsprop:
      // RMSprop's alpha travels in the launch's beta2 slot.
      rms.h.scalar = math::make_rmsprop_hyper<O>(l.lr, l.beta2, l.eps, l.weight_decay, l.momentum, l.centered,
                                                 l.maximize);
      rms.h.vector = rms.h.scalar.template as<VO>();
      n_state = 3;
      break;
  }
  for (int64_t c = chunk_begin; c < chunk_end; ++c) {
    const ChunkRange& chunk = l.chunks[c];
    const ParamSlot& slot = l.slots[chunk.slot];
    O* state[3] = {static_cast<O*>(slot.state[0]), static_cast<O*>(slot.state[1]),
                   static_cast<O*>(slot.state[2])};
    switch (l.kind) {
      case OptimizerKind::Sgd:
        run_chunk<T, O>(l, slot, chunk.begin, chunk.end, sgd, state, n_state);
        break;
      case OptimizerKind::Adam:
        adam.neg_step_size = static_cast<O>(slot.neg_step_size);
        adam.bc2_sqrt = static_cast<O>(slot.bc2_sqrt);
        run_chunk<T, O>(l, slot, chunk.begin, chunk.end, adam, state, n_state);
        break;
      case OptimizerKind::Rmsprop:
        run_chunk<T, O>(l, slot, chunk.begin, chunk.end, rms, state, n_state);
        break;
    }
  }
}

inline void optimizer_chunks(const OptimizerLaunch& l, int64_t chunk_begin, int64_t chunk_end) {
  switch (l.dtype) {
    case ScalarKind::Float:
      return optimizer_chunks_typed<float, float>(l, chunk_begin, chunk_end);
    case ScalarKind::Double:
      return optimizer_chunks_typed<double, double>(l, chunk_begin, chunk_end);
    case ScalarKind::BFloat16:
      return optimizer_chunks_typed<c10::BFloat16, float>(l, chunk_begin, chunk_end);
    case ScalarKind::Half:
      return optimizer_chunks_typed<c10::Half, float>(l, chunk_begin, chunk_end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_train
