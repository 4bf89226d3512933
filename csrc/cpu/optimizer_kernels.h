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

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_kernels.h"
#include "fused_train/optim_math.h"
#include "fused_train/quant_math.h"
#include "fused_train/stochastic_round.h"

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
    return of<typename A::V>();
  }
  template <class V>  // V: O or Vectorized<O>
  const H<V>& of() const {
    if constexpr (std::is_same_v<V, O>) {
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

// math::RunRounding::apply on one vector: lane k is element i + k of the run. The hash's 32-bit multiplies and
// shifts in AVX2/AVX-512 integer lanes, the same operations as the scalar code, and the same per-lane choice of
// key (lanes whose low index wrapped below the run's first take the next range's). Called where r.on.
inline Vectorized<float> round_to_bf16_stochastic(const Vectorized<float>& x, const math::RunRounding& r, int64_t i) {
  const uint32_t index_low = r.first_low + static_cast<uint32_t>(i);
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(index_low)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i key = _mm512_mask_blend_epi32(
      _mm512_cmplt_epu32_mask(index, _mm512_set1_epi32(static_cast<int32_t>(r.first_low))),
      _mm512_set1_epi32(static_cast<int32_t>(r.key)), _mm512_set1_epi32(static_cast<int32_t>(r.next_key)));
  __m512i h = _mm512_xor_si512(index, key);
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x21f0aaad));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x735a2d97));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  const __m512 v = x;
  const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(_mm512_castps_si512(v), _mm512_srli_epi32(h, 16)),
                                           _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u)));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_castsi512_ps(rounded), v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(index_low)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // (no unsigned compare in AVX2: flipping the sign bits of both sides makes the signed one order them so)
  const __m256i sign = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m256i first = _mm256_set1_epi32(static_cast<int32_t>(r.first_low));
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(first, sign), _mm256_xor_si256(index, sign));
  const __m256i key = _mm256_blendv_epi8(_mm256_set1_epi32(static_cast<int32_t>(r.key)),
                                         _mm256_set1_epi32(static_cast<int32_t>(r.next_key)), wrapped);
  __m256i h = _mm256_xor_si256(index, key);
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x21f0aaad));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x735a2d97));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  const __m256 v = x;
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(_mm256_castps_si256(v), _mm256_srli_epi32(h, 16)),
                                           _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
#else
  (void)index_low;  // (the hash is r.apply's, lane by lane)
  float lanes[Vectorized<float>::size()];
  x.store(lanes);
  for (int k = 0; k < Vectorized<float>::size(); ++k) lanes[k] = r.apply(lanes[k], i + k);
  return Vectorized<float>::loadu(lanes);
#endif
}

// The rounding of a tile or block from element `first` of a slot: stochastic when the launch asks for it and the
// params are bf16.
template <class T>
math::RunRounding run_rounding(const OptimizerLaunch& l, const ParamSlot& slot, int64_t first) {
  return math::RunRounding::make(std::is_same_v<T, c10::BFloat16> && l.stochastic_round, slot.rounding_stream,
                                 slot.rounding_offset + static_cast<uint64_t>(first));
}

// Walks one chunk tile by tile. T: storage type of param and grad; O: opmath. A low-precision vector
// (Vectorized<T>, twice as many elements as Vectorized<O>) widens to two opmath vectors, both are updated,
// and the pair narrows back (round to nearest even, as torch does) in one store. tile.bind(t0) points the
// state at the tile starting at element t0.
template <class T, class O, class Tile>
void run_chunk(const OptimizerLaunch& l, const ParamSlot& slot, int64_t begin, int64_t end, Tile& tile) {
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

  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    T* p = param + t0;
    T* g = grad + t0;
    tile.bind(t0);
    const math::RunRounding rounding = run_rounding<T>(l, slot, t0);

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
        if (rounding.on) {
          p0 = round_to_bf16_stochastic(p0, rounding, i);
          p1 = round_to_bf16_stochastic(p1, rounding, i + OV::size());
        }
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
      // to nearest even for bf16/fp16, as torch does (exact when rounding stochastically, which already rounded)
      p[i] = static_cast<T>(rounding.apply(pv, i));
      if (write_back_grad) g[i] = static_cast<T>(gv);
    }
    if (l.zero_grad) std::memset(static_cast<void*>(g), 0, n * sizeof(T));
  }
}

// Full-precision state: tiles of kTile elements, state pointers offset with the tile.
template <class O, int N>
struct StateBases {
  O* base[N];
  void set(const ParamSlot& slot) {
    for (int k = 0; k < N; ++k) base[k] = static_cast<O*>(slot.state[k]);
  }
  O* at(int k, int64_t t0) const { return base[k] == nullptr ? nullptr : base[k] + t0; }
};

template <class O>
struct SgdBound : SgdTile<O>, StateBases<O, 1> {
  void bind(int64_t t0) { this->momentum_buf = this->at(0, t0); }
};
template <class O>
struct AdamBound : AdamTile<O>, StateBases<O, 3> {
  void bind(int64_t t0) {
    this->exp_avg = this->at(0, t0);
    this->exp_avg_sq = this->at(1, t0);
    this->max_exp_avg_sq = this->at(2, t0);
  }
};
template <class O>
struct RmspropBound : RmspropTile<O>, StateBases<O, 3> {
  void bind(int64_t t0) {
    this->square_avg = this->at(0, t0);
    this->grad_avg = this->at(1, t0);
    this->momentum_buf = this->at(2, t0);
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// The code's values split into 16-bit halves, so that a 64-entry permute of 16-bit lanes (two registers) looks up
// 32 lanes: 8 permutes for 32 values of the unsigned code where fp32 entries take 16, and no gather (on Zen 4,
// standalone: 0.12 ns per unsigned value, 0.20 with fp32 entries, 0.33 gathered). The signed code's values
// mirror around code 127, so its tables hold value[127 + d], d = |code - 127| = 0..127, and the sign and code 255
// (1.0, which has no mirror) are patched in.
struct CodeHalves {
  alignas(64) uint16_t high[256];
  alignas(64) uint16_t low[256];
};
inline CodeHalves split_code(const math::DynamicCode& c) {
  CodeHalves h{};
  for (int d = 0; d < (c.is_signed ? 128 : 256); ++d) {
    uint32_t bits;
    std::memcpy(&bits, &c.value[(c.is_signed ? 127 : 0) + d], sizeof bits);
    h.high[d] = static_cast<uint16_t>(bits >> 16);
    h.low[d] = static_cast<uint16_t>(bits);
  }
  return h;
}

struct DequantTables {
  __m512i high[8], low[8];  // 32 halves a register
  bool is_signed;
  void load(const math::DynamicCode& c) {
    is_signed = c.is_signed;
    static const CodeHalves signed_halves = split_code(math::kSignedCode);
    static const CodeHalves unsigned_halves = split_code(math::kUnsignedCode);
    const CodeHalves& h = c.is_signed ? signed_halves : unsigned_halves;
    for (int j = 0; j < 8; ++j) {
      high[j] = _mm512_load_si512(h.high + 32 * j);
      low[j] = _mm512_load_si512(h.low + 32 * j);
    }
  }
  // Lanes of idx (< 256) looked up in 4 (signed) or 8 (unsigned) registers of 32 halves.
  __m512i look_up(const __m512i (&t)[8], __m512i idx) const {
    const __mmask32 bit6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
    const __m512i below_128 = _mm512_mask_mov_epi16(_mm512_permutex2var_epi16(t[0], idx, t[1]), bit6,
                                                    _mm512_permutex2var_epi16(t[2], idx, t[3]));
    if (is_signed) return below_128;
    const __m512i from_128 = _mm512_mask_mov_epi16(_mm512_permutex2var_epi16(t[4], idx, t[5]), bit6,
                                                   _mm512_permutex2var_epi16(t[6], idx, t[7]));
    return _mm512_mask_mov_epi16(below_128, _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128)), from_128);
  }
  // out[0, 32) = value[p[0, 32)] * scale
  void dequantize32(const uint8_t* p, __m512 scale, float* out) const {
    // unpacklo/hi_epi16 below interleave the halves within each 128-bit lane: codes 4j..4j+3 (j = 0..3, the first
    // 16) go to words 8j..8j+3 and codes 16+4j.. to words 8j+4.., so that the two results come out in order
    const __m512i order = _mm512_set_epi16(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8,
                                           23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i c = _mm512_permutexvar_epi16(
        order, _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
    __m512i hi, lo;
    if (is_signed) {
      const __m512i d = _mm512_abs_epi16(_mm512_sub_epi16(c, _mm512_set1_epi16(127)));
      hi = look_up(high, d);
      lo = look_up(low, d);
      hi = _mm512_mask_add_epi16(hi, _mm512_cmplt_epu16_mask(c, _mm512_set1_epi16(127)), hi,
                                 _mm512_set1_epi16(static_cast<int16_t>(0x8000)));  // the sign bit
      const __mmask32 one = _mm512_cmpeq_epi16_mask(c, _mm512_set1_epi16(255));  // d = 128 looked up 0
      hi = _mm512_mask_mov_epi16(hi, one, _mm512_set1_epi16(0x3F80));               // 1.0f = 0x3F800000
    } else {
      hi = look_up(high, c);
      lo = look_up(low, c);
    }
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(lo, hi)), scale));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(lo, hi)), scale));
  }
};
#else
struct DequantTables {  // (AVX2 and the scalar code read DynamicCode::value)
  void load(const math::DynamicCode&) {}
};
#endif

// out[0, n) = the values of codes[0, n) times scale: by 16-bit permutes on AVX-512, a gather on AVX2, else scalar.
inline void dequantize_block(const uint8_t* codes, int64_t n, const math::DynamicCode& c,
                             [[maybe_unused]] const DequantTables& tables, float scale, float* out) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vscale = _mm512_set1_ps(scale);
  for (; i + 32 <= n; i += 32) tables.dequantize32(codes + i, vscale, out + i);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 vscale = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(c.value, idx, 4), vscale));
  }
#endif
  for (; i < n; ++i) out[i] = c.value[codes[i]] * scale;
}

// Writes the codes of x[0, n) * inverse (1 / their block's absmax) into out: math::quantize_value's codes, on
// AVX-512 16 lanes at a time by math::quantize_value_by_binade (one lookup for the state, each state's constants
// in one register, a lane picking its entry by a permute), on AVX2 8 lanes by quantize_value's own comparisons.
inline void quantize_tile(const float* x, float inverse, int64_t n, const math::DynamicCode& c, uint8_t* out) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const math::BinadeCode& t = c.is_signed ? math::kSignedBinade : math::kUnsignedBinade;
  const __m512i state_lo = _mm512_loadu_si512(t.state), state_hi = _mm512_loadu_si512(t.state + 16);
  const __m512 threshold_lo = _mm512_loadu_ps(t.threshold), threshold_hi = _mm512_loadu_ps(t.threshold + 16);
  const __m512 low = _mm512_loadu_ps(t.low), inverse_width = _mm512_loadu_ps(t.inverse_width);
  const __m512i first_and_last = _mm512_loadu_si512(t.first_and_last);
  const __m512 scale = _mm512_set1_ps(inverse), zero = _mm512_setzero_ps();
  const __m512i bias = _mm512_set1_epi32(math::kBinadeBias), last_binade = _mm512_set1_epi32(31);
  const __m512i one = _mm512_set1_epi32(1), low_byte = _mm512_set1_epi32(255), mirror = _mm512_set1_epi32(254);
  for (; i + 16 <= n; i += 16) {
    const __m512 xv = _mm512_mul_ps(_mm512_loadu_ps(x + i), scale);
    const __m512 a = c.is_signed ? _mm512_abs_ps(xv) : xv;
    const __mmask16 negative = c.is_signed ? _mm512_cmp_ps_mask(xv, zero, _CMP_LT_OQ) : 0;
    const __m512i b = _mm512_min_epu32(_mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 23), bias),
                                       last_binade);
    __m512i state = _mm512_permutex2var_epi32(state_lo, b, state_hi);
    const __mmask16 above = _mm512_cmp_ps_mask(a, _mm512_permutex2var_ps(threshold_lo, b, threshold_hi), _CMP_GT_OQ);
    state = _mm512_mask_add_epi32(state, above, state, one);
    // f >= 0 (a state's magnitudes lie above its low end), or NaN, which is state 0's only: converted unsigned,
    // NaN is UINT_MAX and the clamp to state 0's last, 0, gives quantize_value's k = 0 without its max(f, 0)
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(a, _mm512_permutexvar_ps(state, low)),
                                   _mm512_permutexvar_ps(state, inverse_width));
    const __m512i first_last = _mm512_permutexvar_epi32(state, first_and_last);
    const __m512i k = _mm512_min_epu32(_mm512_cvttps_epu32(f), _mm512_srli_epi32(first_last, 8));
    __m512i code = _mm512_add_epi32(_mm512_and_si512(first_last, low_byte), k);
    if (c.is_signed) {
      code = _mm512_mask_max_epi32(code, negative, _mm512_sub_epi32(mirror, code), _mm512_setzero_si512());
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(code));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 low = _mm256_loadu_ps(c.low), inverse_width = _mm256_loadu_ps(c.inverse_width);
  const __m256i last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.last));
  const __m256i positive = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.positive));
  const __m256i negative = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.negative));
  const __m256i one_positive = _mm256_set1_epi32(c.one_positive), one_negative = _mm256_set1_epi32(c.one_negative);
  const __m256 zero = _mm256_setzero_ps(), sign_bit = _mm256_set1_ps(-0.0f), scale = _mm256_set1_ps(inverse);
  __m256 threshold[8];
  for (int t = 0; t < 8; ++t) threshold[t] = _mm256_set1_ps(c.threshold[t]);
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_mul_ps(_mm256_loadu_ps(x + i), scale);
    const __m256 is_negative = c.is_signed ? _mm256_cmp_ps(xv, zero, _CMP_LT_OQ) : zero;
    const __m256 a = c.is_signed ? _mm256_andnot_ps(sign_bit, xv) : xv;
    __m256i state = _mm256_setzero_si256();
    for (int t = 0; t < 7; ++t) {
      state = _mm256_sub_epi32(state, _mm256_castps_si256(_mm256_cmp_ps(a, threshold[t], _CMP_GT_OQ)));
    }
    const __m256 f = _mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(a, _mm256_permutevar8x32_ps(low, state)),
                                                 _mm256_permutevar8x32_ps(inverse_width, state)),
                                   zero);  // (max_ps returns its second operand, 0, for NaN)
    const __m256i k = _mm256_min_epi32(_mm256_cvttps_epi32(f), _mm256_permutevar8x32_epi32(last, state));
    const __m256 neg = is_negative;
    __m256i code = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_permutevar8x32_epi32(positive, state), k)),
                         _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_permutevar8x32_epi32(negative, state), k)),
                         neg));
    const __m256i one = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(one_positive), _mm256_castsi256_ps(one_negative), neg));
    code = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(code), _mm256_castsi256_ps(one),
                                                _mm256_cmp_ps(a, threshold[7], _CMP_GT_OQ)));
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(words, words));
  }
#endif
  for (; i < n; ++i) out[i] = math::quantize_value(x[i] * inverse, c);
}

// 8-bit state (Adam's two moments, SGD's momentum, RMSprop's square average and momentum), one
// quantization block (math::QuantRows) at a time: each block's codes are dequantized with its absmax into a stack
// buffer (in L1), updated there in fp32 (the param from the updated fp32 moments, as bitsandbytes does), and
// quantized once the block's new absmax is known. A loop of its own rather than run_chunk's tiles: the running
// absmax and the constants stay in registers.
//
// Op (Adam8bitOp, Sgd8bitOp, Rmsprop8bitOp below) is the optimizer's update on its K quantized moments:
//   static constexpr int kMoments;                    // K, 1 to 3
//   static constexpr bool is_signed(int k);           // moment k's code: signed, or unsigned (squares)
//   void set_slot(const ParamSlot&);                 // the per-param scalars (Adam's bias corrections), if any
//   template <class V> void update(V& param, const V& grad, V (&moment)[kMoments]) const;  // V: float or FV
// and the slot holds (codes, absmax) of moment k at state[2k], state[2k + 1].
// (the moments' loops fully unrolled, so that the per-moment arrays live in registers)
#define FT_UNROLL_K _Pragma("GCC unroll 4")
template <class T, class Op>
void run_8bit_chunk(const OptimizerLaunch& l, const ParamSlot& slot, int64_t begin, int64_t end, const Op& shared_op) {
  const Op op = shared_op;  // a local copy: its constants stay in registers (stores to the buffers cannot alias it)
  using FV = Vectorized<float>;
  constexpr int K = Op::kMoments;
  T* param = static_cast<T*>(slot.param);
  T* grad = static_cast<T*>(slot.grad);
  uint8_t* codes[K];
  float* absmax[K];
  const math::DynamicCode* code[K];
  FT_UNROLL_K for (int k = 0; k < K; ++k) {
    codes[k] = static_cast<uint8_t*>(slot.state[2 * k]);
    absmax[k] = static_cast<float*>(slot.state[2 * k + 1]);
    code[k] = Op::is_signed(k) ? &math::kSignedCode : &math::kUnsignedCode;
  }
  const bool unscale = l.has_grad_scale;
  const bool write_back_grad = l.has_grad_scale && !l.zero_grad;
  const float grad_scale = static_cast<float>(l.grad_scale);
  const FV vgrad_scale(grad_scale);
  alignas(64) float fresh[K][math::kQuantBlock];
  DequantTables tables[K];
  FT_UNROLL_K for (int k = 0; k < K; ++k) tables[k].load(*code[k]);

  // The blocks that start in [begin, end), whole (the last may run past end: no other chunk touches it).
  const math::QuantRows rows = math::QuantRows::of(slot.quant_row);
  const int64_t last_block = rows.blocks_before(end);
  for (int64_t block = rows.blocks_before(begin); block < last_block; ++block) {
    const int64_t b0 = rows.start(block);
    const int64_t n = rows.size(block);
    T* p = param + b0;
    T* g = grad + b0;
    // The running absmax as bit patterns: non-negative floats order as their int32 bits, and NaN's bits (sign
    // cleared) are above inf's, so one integer max is a NaN-propagating float max.
    Vectorized<int32_t> vmax_bits[K];
    // The block's moments in fp32, in fresh (with the old absmax; the new one replaces it below); the update
    // overwrites them with the new ones.
    FT_UNROLL_K for (int k = 0; k < K; ++k) {
      vmax_bits[k] = Vectorized<int32_t>(0);
      dequantize_block(codes[k] + b0, n, *code[k], tables[k], absmax[k][block], fresh[k]);
    }
    const math::RunRounding rounding = run_rounding<T>(l, slot, b0);

    // One vector of params at element i: update, keep the new moments and their running absmax.
    auto update = [&](FV& pv, const FV& gv, int64_t i) {
      FV m[K];
      FT_UNROLL_K for (int k = 0; k < K; ++k) m[k] = FV::loadu(fresh[k] + i);
      op.update(pv, gv, m);
      FT_UNROLL_K for (int k = 0; k < K; ++k) {
        m[k].store(fresh[k] + i);
        // (abs for the unsigned moments too: it clears x86's negative default NaN, and a square average that
        // RMSprop's alpha > 1 made negative counts as the Python quantizer counts it)
        vmax_bits[k] = at::vec::maximum(vmax_bits[k], at::vec::cast<int32_t>(m[k].abs()));
      }
    };
    int64_t i = 0;
    if constexpr (!std::is_same_v<T, float>) {
      using TV = Vectorized<T>;
      for (; i + TV::size() <= n; i += TV::size()) {
        auto [p0, p1] = at::vec::convert_to_float<T>(TV::loadu(p + i));
        auto [g0, g1] = at::vec::convert_to_float<T>(TV::loadu(g + i));
        if (unscale) {
          g0 = g0 / vgrad_scale;
          g1 = g1 / vgrad_scale;
        }
        update(p0, g0, i);
        update(p1, g1, i + FV::size());
        if (rounding.on) {
          p0 = round_to_bf16_stochastic(p0, rounding, i);
          p1 = round_to_bf16_stochastic(p1, rounding, i + FV::size());
        }
        at::vec::convert_from_float<T>(p0, p1).store(p + i);
        if (write_back_grad) at::vec::convert_from_float<T>(g0, g1).store(g + i);
      }
    } else {
      for (; i + FV::size() <= n; i += FV::size()) {
        FV pv = FV::loadu(p + i), gv = FV::loadu(g + i);
        if (unscale) gv = gv / vgrad_scale;
        update(pv, gv, i);
        pv.store(p + i);
        if (write_back_grad) gv.store(g + i);
      }
    }
    float max[K];
    FT_UNROLL_K for (int k = 0; k < K; ++k) max[k] = 0.0f;
    for (; i < n; ++i) {
      float pv = static_cast<float>(p[i]), gv = static_cast<float>(g[i]);
      if (unscale) gv = gv / grad_scale;
      float m[K];
      FT_UNROLL_K for (int k = 0; k < K; ++k) m[k] = fresh[k][i];
      op.update(pv, gv, m);
      FT_UNROLL_K for (int k = 0; k < K; ++k) {
        fresh[k][i] = m[k];
        max[k] = math::max_(max[k], std::fabs(m[k]));
      }
      // to nearest even for bf16/fp16, as torch does (exact when rounding stochastically, which already rounded)
      p[i] = static_cast<T>(rounding.apply(pv, i));
      if (write_back_grad) g[i] = static_cast<T>(gv);
    }
    FT_UNROLL_K for (int k = 0; k < K; ++k) {
      int32_t lanes[FV::size()];
      vmax_bits[k].store(lanes);
      float vector_max;
      const int32_t max_bits = *std::max_element(lanes, lanes + FV::size());
      std::memcpy(&vector_max, &max_bits, sizeof vector_max);
      max[k] = math::max_(max[k], vector_max);  // NaN-propagating
      absmax[k][block] = max[k];
      quantize_tile(fresh[k], math::inverse_absmax(max[k]), n, *code[k], codes[k] + b0);
    }
    if (l.zero_grad) std::memset(static_cast<void*>(g), 0, n * sizeof(T));
  }
}

// A scalar in both widths, picked by the math type as HyperPair::of picks hyperparameters.
struct FloatPair {
  float scalar;
  Vectorized<float> vector;
  explicit FloatPair(float x = 0.0f) : scalar(x), vector(x) {}
  template <class V>
  const V& of() const {
    if constexpr (std::is_same_v<V, float>) {
      return scalar;
    } else {
      return vector;
    }
  }
};

// 8-bit Adam / AdamW: (exp_avg signed, exp_avg_sq unsigned); the bias corrections per slot.
struct Adam8bitOp {
  static constexpr int kMoments = 2;
  static constexpr bool is_signed(int k) { return k == 0; }
  HyperPair<float, math::AdamHyper> h;
  FloatPair neg_step_size, bc2_sqrt;
  void set_slot(const ParamSlot& slot) {
    neg_step_size = FloatPair(static_cast<float>(slot.neg_step_size));
    bc2_sqrt = FloatPair(static_cast<float>(slot.bc2_sqrt));
  }
  template <class V>
  void update(V& param, const V& grad, V (&moment)[2]) const {
    math::adam_update<V>(param, grad, moment[0], moment[1], nullptr, neg_step_size.of<V>(), bc2_sqrt.of<V>(),
                         h.of<V>());
  }
};

// 8-bit SGD: the momentum buffer (signed); with is_first_step it becomes the gradient, as torch's clone.
struct Sgd8bitOp {
  static constexpr int kMoments = 1;
  static constexpr bool is_signed(int) { return true; }
  HyperPair<float, math::SgdHyper> h;
  void set_slot(const ParamSlot&) {}
  template <class V>
  void update(V& param, const V& grad, V (&moment)[1]) const {
    math::sgd_update<V>(param, grad, &moment[0], h.of<V>());
  }
};

// 8-bit RMSprop (not centered): square_avg (unsigned), then momentum_buffer (signed) with momentum; one instantiation
// each, so a call without momentum carries no second moment.
template <bool kMomentum>
struct Rmsprop8bitOp {
  static constexpr int kMoments = 1 + int{kMomentum};
  static constexpr bool is_signed(int k) { return k > 0; }
  HyperPair<float, math::RmspropHyper> h;
  void set_slot(const ParamSlot&) {}
  template <class V>
  void update(V& param, const V& grad, V (&moment)[kMoments]) const {
    V unused(0.0f);
    V* momentum_buf = &unused;
    if constexpr (kMomentum) momentum_buf = &moment[1];
    math::rmsprop_update<V>(param, grad, moment[0], nullptr, momentum_buf, h.of<V>());
  }
};

// The 8-bit ops over fp32, bf16 or fp16 params (fp32 math). A chunk updates the blocks that start in it.
template <class T, class Op>
void run_8bit_chunks(const OptimizerLaunch& l, int64_t chunk_begin, int64_t chunk_end, Op& op) {
  for (int64_t k = chunk_begin; k < chunk_end; ++k) {
    const ChunkRange& chunk = l.chunks[k];
    const ParamSlot& slot = l.slots[chunk.slot];
    op.set_slot(slot);
    run_8bit_chunk<T>(l, slot, chunk.begin, chunk.end, op);
  }
}

template <class T>
void optimizer_8bit_chunks_typed(const OptimizerLaunch& l, int64_t chunk_begin, int64_t chunk_end) {
  using FV = Vectorized<float>;
  switch (l.kind) {
    case OptimizerKind::Adam8bit: {
      Adam8bitOp op;
      op.h.scalar = math::make_adam_hyper<float>(l.lr, l.beta1, l.beta2, l.weight_decay, l.eps, false, l.maximize,
                                                 l.decoupled_weight_decay);
      op.h.vector = op.h.scalar.template as<FV>();
      return run_8bit_chunks<T>(l, chunk_begin, chunk_end, op);
    }
    case OptimizerKind::Sgd8bit: {
      Sgd8bitOp op;
      op.h.scalar = math::make_sgd_hyper<float>(l.lr, l.momentum, l.dampening, l.weight_decay, l.nesterov,
                                                l.maximize, l.first_step);
      op.h.vector = op.h.scalar.template as<FV>();
      return run_8bit_chunks<T>(l, chunk_begin, chunk_end, op);
    }
    default: {  // Rmsprop8bit (alpha in the beta2 slot, as for Rmsprop; never centered)
      const auto hyper = math::make_rmsprop_hyper<float>(l.lr, l.beta2, l.eps, l.weight_decay, l.momentum, false,
                                                         l.maximize);
      auto run_with = [&](auto op) {
        op.h.scalar = hyper;
        op.h.vector = hyper.template as<FV>();
        run_8bit_chunks<T>(l, chunk_begin, chunk_end, op);
      };
      return hyper.has_momentum ? run_with(Rmsprop8bitOp<true>{}) : run_with(Rmsprop8bitOp<false>{});
    }
  }
}

template <class T, class O>
void optimizer_chunks_typed(const OptimizerLaunch& l, int64_t chunk_begin, int64_t chunk_end) {
  using VO = Vectorized<O>;
  // Hyperparameters once per call, in both widths.
  SgdBound<O> sgd{};
  AdamBound<O> adam{};
  RmspropBound<O> rms{};
  switch (l.kind) {
    case OptimizerKind::Sgd:
      sgd.h.scalar = math::make_sgd_hyper<O>(l.lr, l.momentum, l.dampening, l.weight_decay,
                                             l.nesterov, l.maximize, l.first_step);
      sgd.h.vector = sgd.h.scalar.template as<VO>();
      break;
    case OptimizerKind::Adam:
      adam.h.scalar = math::make_adam_hyper<O>(l.lr, l.beta1, l.beta2, l.weight_decay, l.eps, l.amsgrad,
                                               l.maximize, l.decoupled_weight_decay);
      adam.h.vector = adam.h.scalar.template as<VO>();
      break;
    case OptimizerKind::Rmsprop:
      // RMSprop's alpha travels in the launch's beta2 slot.
      rms.h.scalar = math::make_rmsprop_hyper<O>(l.lr, l.beta2, l.eps, l.weight_decay, l.momentum, l.centered,
                                                 l.maximize);
      rms.h.vector = rms.h.scalar.template as<VO>();
      break;
    default:
      break;  // the 8-bit kinds: optimizer_8bit_chunks_typed
  }
  for (int64_t c = chunk_begin; c < chunk_end; ++c) {
    const ChunkRange& chunk = l.chunks[c];
    const ParamSlot& slot = l.slots[chunk.slot];
    switch (l.kind) {
      case OptimizerKind::Sgd:
        sgd.set(slot);
        run_chunk<T, O>(l, slot, chunk.begin, chunk.end, sgd);
        break;
      case OptimizerKind::Adam:
        adam.set(slot);
        adam.neg_step_size = static_cast<O>(slot.neg_step_size);
        adam.bc2_sqrt = static_cast<O>(slot.bc2_sqrt);
        run_chunk<T, O>(l, slot, chunk.begin, chunk.end, adam);
        break;
      case OptimizerKind::Rmsprop:
        rms.set(slot);
        run_chunk<T, O>(l, slot, chunk.begin, chunk.end, rms);
        break;
      default:
        break;
    }
  }
}

inline void optimizer_chunks(const OptimizerLaunch& l, int64_t chunk_begin, int64_t chunk_end) {
  if (is_8bit(l.kind)) {
    switch (l.dtype) {
      case ScalarKind::BFloat16:
        return optimizer_8bit_chunks_typed<c10::BFloat16>(l, chunk_begin, chunk_end);
      case ScalarKind::Half:
        return optimizer_8bit_chunks_typed<c10::Half>(l, chunk_begin, chunk_end);
      default:  // float (the 8-bit ops refuse float64 params, which keep full-precision state)
        return optimizer_8bit_chunks_typed<float>(l, chunk_begin, chunk_end);
    }
  }
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
