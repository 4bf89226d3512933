// Blockwise 8-bit quantization of optimizer state (Dettmers et al., "8-bit Optimizers via Block-wise
// Quantization", 2021), shared by the CPU and CUDA kernels and checked without libtorch in tests/cpp.
//
// A tensor is cut into blocks of kQuantBlock elements in its (contiguous) order. Each block keeps one fp32
// absmax; each element one uint8 index into a 256-value "dynamic" code on [-1, 1] (signed, the first moment)
// or [0, 1] (unsigned, the second moment). Dequantizing is code.value[c] * absmax. Quantizing x (already
// divided by the block's absmax) picks the nearest value, as quantize_value below computes it.
// fused_train/optim/_quantization.py defines the same code and the same rounding in torch ops.
//
// The dynamic code is bitsandbytes' (create_dynamic_map): per decade 10^(i-6), i = 0..6, 2^i (signed, each
// sign) or 2^(i+1) (unsigned) values at the midpoints of an even split of [0.1, 1], plus 0 and 1. Small
// magnitudes get a fine grid, large ones a relative error of at most a few per cent.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "fused_train/macros.h"

namespace fused_train {
namespace math {

constexpr int64_t kQuantBlock = 256;

// Which elements each absmax covers. The state of a tensor viewed as rows of `row` elements (the optimizer picks
// the rows: see fused_train/optim/_state8bit.py) cuts each row into blocks of kQuantBlock elements, the last one
// shorter where row is not a multiple of it; the absmax holds one per block, rows after rows. A 1-D state is one
// row (row = numel). Rows are what FSDP2 and tensor parallelism cut a param into, so each rank then holds whole
// blocks of the whole tensor. Work is cut into chunks of elements independently of the rows (the CPU's threads,
// the GPU's blocks): a chunk updates the quantization blocks that start in it, all of each, so every block has
// exactly one owner and may run past its chunk's end (by less than kQuantBlock elements).
struct QuantRows {
  int64_t row;             // elements per row, >= 1
  int64_t blocks_per_row;  // ceil(row / kQuantBlock)

  FT_HOST_DEVICE FT_INLINE static QuantRows of(int64_t row) {
    row = row > 0 ? row : 1;
    return {row, (row + kQuantBlock - 1) / kQuantBlock};
  }
  // The first element of block b, and its size.
  FT_HOST_DEVICE FT_INLINE int64_t start(int64_t b) const {
    return (b / blocks_per_row) * row + (b % blocks_per_row) * kQuantBlock;
  }
  FT_HOST_DEVICE FT_INLINE int64_t size(int64_t b) const {
    const int64_t rest = row - (b % blocks_per_row) * kQuantBlock;
    return rest < kQuantBlock ? rest : kQuantBlock;
  }
  // The number of blocks that start before element e (0 <= e <= numel): the blocks a chunk [begin, end) updates
  // are [blocks_before(begin), blocks_before(end)).
  FT_HOST_DEVICE FT_INLINE int64_t blocks_before(int64_t e) const {
    return (e / row) * blocks_per_row + (e % row + kQuantBlock - 1) / kQuantBlock;
  }
};

// The nearest value, found without a search: each magnitude a = |x| (x itself for the unsigned code) falls
// in one of 9 states by comparing it with the code's decade boundaries (state 0: nearer 0 than any other
// value, 1..7: decade 0..6, and past threshold[7]: nearer 1). Inside a decade the values are evenly spaced,
// so the nearest one is k = floor((a - low) * inverse_width), clamped to the decade. The comparisons and
// the one product are fp32 operations, done alike by the scalar code below, the CPU vector code
// (cpu/optimizer_kernels.h), the CUDA kernel and fused_train/optim/_quantization.py, so all give the same
// codes. The result is the nearest value up to fp32 rounding of the midpoints between two values.
struct DynamicCode {
  float value[256];
  float threshold[8];     // decade boundaries (midpoints between the neighbouring values), ascending
  // per state 0..7 (state 0: zero; its width is 0, so k = 0 there)
  float low[8];           // the decade's lower end, 0.1 * 10^(i-6)
  float inverse_width[8]; // values per unit in the decade: n / (0.9 * 10^(i-6))
  int32_t last[8];        // n - 1: the decade's last k
  int32_t positive[8];    // code of the decade's first value for x >= 0 (state 0: the code of 0)
  int32_t negative[8];    // code of the decade's first value for x < 0 (signed code; codes go down from it)
  int32_t one_positive;   // the code of 1.0
  int32_t one_negative;   // the most negative code (the signed code has no -1)
  bool is_signed;
};

FT_HOST_DEVICE FT_INLINE uint8_t quantize_value(float x, const DynamicCode& c) {
  const bool negative = c.is_signed && x < 0.0f;
  const float a = negative ? -x : x;
  int state = 0;
  for (int t = 0; t < 7; ++t) state += a > c.threshold[t] ? 1 : 0;
  if (a > c.threshold[7]) return static_cast<uint8_t>(negative ? c.one_negative : c.one_positive);
  float f = (a - c.low[state]) * c.inverse_width[state];
  f = f > 0.0f ? f : 0.0f;  // also NaN (state 0): the code of 0; the block's NaN absmax carries the NaN
  int32_t k = static_cast<int32_t>(f);
  k = k < c.last[state] ? k : c.last[state];
  return static_cast<uint8_t>(negative ? c.negative[state] - k : c.positive[state] + k);
}

// 1/absmax, or 0 for an all-zero block (every element then gets the code of 0) and for a block below the
// smallest normal float, whose 1/absmax would overflow to inf (moments decaying without gradients reach it: a
// frozen row's exp_avg after ~800 steps). A NaN absmax gives 0 here too; the block dequantizes to NaN anyway.
constexpr float kSmallestNormal = 1.17549435e-38f;  // FLT_MIN
FT_HOST_DEVICE FT_INLINE float inverse_absmax(float absmax) {
  return absmax >= kSmallestNormal ? 1.0f / absmax : 0.0f;
}

// The signed or unsigned dynamic code, built at compile time (kSignedCode, kUnsignedCode below), so the CUDA
// kernels read it from device memory with nothing to upload first.
constexpr DynamicCode make_dynamic_code(bool is_signed) {
  DynamicCode code{};
  const double decade[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
  float magnitude[256] = {};  // the positive values below 1, ascending
  int first[8] = {0};
  int n_magnitudes = 0;
  for (int i = 0; i < 7; ++i) {
    const int points = is_signed ? (1 << i) : (2 << i);
    first[i + 1] = first[i] + points;
    for (int k = 0; k < points; ++k) {
      magnitude[n_magnitudes++] = static_cast<float>(decade[i] * (0.1 + (k + 0.5) * 0.9 / points));
    }
    code.low[i + 1] = static_cast<float>(decade[i] * 0.1);
    code.inverse_width[i + 1] = static_cast<float>(points / (decade[i] * 0.9));
    code.last[i + 1] = points - 1;
  }
  code.is_signed = is_signed;
  // Sorted code: signed = (-magnitudes descending, 0, magnitudes, 1); unsigned = (0, magnitudes, 1).
  const int zero = is_signed ? n_magnitudes : 0;
  int n = 0;
  if (is_signed) {
    for (int j = n_magnitudes - 1; j >= 0; --j) code.value[n++] = -magnitude[j];
  }
  code.value[n++] = 0.0f;
  for (int j = 0; j < n_magnitudes; ++j) code.value[n++] = magnitude[j];
  code.value[n++] = 1.0f;
  for (int i = 1; i < 8; ++i) {
    code.positive[i] = zero + 1 + first[i - 1];
    code.negative[i] = zero - 1 - first[i - 1];
  }
  code.low[0] = 0.0f;
  code.inverse_width[0] = 0.0f;
  code.last[0] = 0;
  code.positive[0] = code.negative[0] = zero;
  code.one_positive = 255;
  code.one_negative = 0;
  // threshold[0]: between 0 and the smallest value; [1..6]: between a decade's last value and the next's first;
  // [7]: between the largest value below 1 and 1.
  code.threshold[0] = (0.0f + magnitude[0]) * 0.5f;
  for (int i = 1; i < 7; ++i) code.threshold[i] = (magnitude[first[i] - 1] + magnitude[first[i]]) * 0.5f;
  code.threshold[7] = (magnitude[n_magnitudes - 1] + 1.0f) * 0.5f;
  return code;
}

inline constexpr DynamicCode kSignedCode = make_dynamic_code(true);
inline constexpr DynamicCode kUnsignedCode = make_dynamic_code(false);

// The same rounding with the state found by one lookup instead of 7 comparisons, for SIMD lanes that pick table
// entries by permutes (the AVX-512 kernels, 16 or 32 entries a register). A magnitude's binade, [2^e, 2^(e+1)),
// is its float exponent; the code's thresholds are at least 6x apart, so a binade holds at most one of them and
// the state is binade_state[b] + (a > binade_threshold[b]). Being nearer 1 than any other value is state 8 here
// (value 1.0: low 0, inverse width 0, so k = 0), so the rest needs no special case either.
// b = (biased exponent - kBinadeBias) as unsigned, clamped to 31: binades 2^-29 .. 2^1 are b = 0..30, and b = 31
// holds everything else: below 2^-29 (under every threshold), NaN (state 0, as quantize_value) and a >= 4, which
// never occurs (a = |x| / absmax of x's own block is at most 1 plus rounding) and would not get quantize_value's
// code 255 here.
constexpr int32_t kBinadeBias = 127 - 29;

struct BinadeCode {
  int32_t state[32];          // the state below binade b
  float threshold[32];        // the threshold inside binade b, or +inf
  float low[16];              // per state 0..8 as DynamicCode, 8 being "nearer 1"
  float inverse_width[16];
  int32_t first_and_last[16]; // positive[s] | last[s] << 8
  bool one_threshold_per_binade;  // checked below at compile time
};

constexpr BinadeCode make_binade_code(const DynamicCode& c) {
  BinadeCode t{};
  t.one_threshold_per_binade = true;
  float low_end = 1.0f;  // 2^-29, exactly
  for (int i = 0; i < 29; ++i) low_end *= 0.5f;
  for (int b = 0; b < 32; ++b, low_end *= 2.0f) {
    t.threshold[b] = std::numeric_limits<float>::infinity();
    if (b == 31) break;  // state 0
    int below = 0, inside = 0;
    for (int k = 0; k < 8; ++k) {
      if (c.threshold[k] < low_end) {
        ++below;
      } else if (c.threshold[k] < 2.0f * low_end) {
        ++inside;
        t.threshold[b] = c.threshold[k];
      }
    }
    if (inside > 1 || (b == 0 && below > 0)) t.one_threshold_per_binade = false;
    t.state[b] = below;
  }
  for (int s = 0; s < 8; ++s) {
    t.low[s] = c.low[s];
    t.inverse_width[s] = c.inverse_width[s];
    t.first_and_last[s] = c.positive[s] | (c.last[s] << 8);
  }
  t.first_and_last[8] = c.one_positive;
  return t;
}

inline constexpr BinadeCode kSignedBinade = make_binade_code(kSignedCode);
inline constexpr BinadeCode kUnsignedBinade = make_binade_code(kUnsignedCode);
static_assert(kSignedBinade.one_threshold_per_binade && kUnsignedBinade.one_threshold_per_binade,
              "a binade holds two thresholds of the dynamic code: the one-lookup state needs another table");

// quantize_value by the binade lookup, the steps the AVX-512 kernel runs per lane (cpu/optimizer_kernels.h, which
// also drops max(f, 0) for an unsigned conversion); tests/cpp checks it equals quantize_value over every 61st
// float below 4 and around each value and threshold (host only: the CUDA kernels keep quantize_value).
// The signed code's negative half mirrors the positive one around code 127 (code 254 - c), except for 1.0, whose
// mirror would be -1: its code is 0.
inline uint8_t quantize_value_by_binade(float x, const DynamicCode& c, const BinadeCode& t) {
  const bool negative = c.is_signed && x < 0.0f;
  const float a = c.is_signed ? std::fabs(x) : x;
  uint32_t bits = 0;
  std::memcpy(&bits, &a, sizeof bits);
  uint32_t b = (bits >> 23) - static_cast<uint32_t>(kBinadeBias);
  b = b < 31u ? b : 31u;
  const int s = t.state[b] + (a > t.threshold[b] ? 1 : 0);
  float f = (a - t.low[s]) * t.inverse_width[s];
  f = f > 0.0f ? f : 0.0f;  // NaN too
  int32_t k = static_cast<int32_t>(f);
  const int32_t last = t.first_and_last[s] >> 8;
  k = k < last ? k : last;
  int32_t code = (t.first_and_last[s] & 255) + k;
  if (negative) code = 254 - code > 0 ? 254 - code : 0;
  return static_cast<uint8_t>(code);
}

}  // namespace math
}  // namespace fused_train
