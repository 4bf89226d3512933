// Blockwise 8-bit quantization of optimizer state (Dettmers et al., "8-bit Optimizers via Block-wise
// Quantization", 2021), shared by the CPU and CUDA kernels and checked without libtorch in tests/cpp.
//
// A tensor is cut into blocks of kQuantBlock elements in its (contiguous) order. Each block keeps one fp32
// absmax; each element one uint8 index into a 256-value "dynamic" code on [-1, 1] (signed, the first moment)
// or [0, 1] (unsigned, the second moment). Dequantizing is code.value[c] * absmax. Quantizing x (already
// divided by the block's absmax) picks the nearest value: the code is the number of midpoints
// code.boundary[j] = (value[j] + value[j+1]) * 0.5f that lie below x, so an exact midpoint rounds down.
// fused_train/optim/_quantization.py defines the same code and the same rounding in torch ops.
//
// The dynamic code is bitsandbytes' (create_dynamic_map): per decade 10^(i-6), i = 0..6, 2^i (signed, each
// sign) or 2^(i+1) (unsigned) values at the midpoints of an even split of [0.1, 1], plus 0 and 1. Small
// magnitudes get a fine grid, large ones a relative error of at most a few per cent.
#pragma once

#include <cmath>
#include <cstdint>

#include "fused_train/macros.h"

namespace fused_train {
namespace math {

constexpr int64_t kQuantBlock = 256;

// Nearest-value search without a binary search: a table indexed by the sign, the binade and the top
// kLutMantissaBits mantissa bits of x gives the smallest code any x of that cell can take, and every cell
// holds at most one midpoint (checked when the table is built, and in tests/cpp), so one comparison finishes
// it. Magnitudes below 2^-kLutBinades (under the smallest midpoint, 2.75e-7) share the lowest cell; 1.0 and
// above (x can exceed 1 by an ulp, as x = s * (1/absmax)) the top one.
constexpr int kLutMantissaBits = 7;
constexpr int kLutBinades = 22;
constexpr int kLutCellsPerSign = (kLutBinades + 1) << kLutMantissaBits;
constexpr int kLutSize = 2 * kLutCellsPerSign;

struct DynamicCode {
  float value[256];
  float boundary[256];  // [255] = +inf, so that the one comparison may read past the last midpoint
  uint8_t lut[kLutSize + 4];  // + 4: the CPU kernels read it with 32-bit gathers
  bool is_signed;
  bool valid;  // every cell holds at most one midpoint (false would be a bug in this file)
};

// The cell of x: sign, then binade (clamped to the table), then mantissa bits. Integer-only, so the CPU
// vector path (cpu/optimizer_kernels.h) computes the same key lane by lane.
FT_HOST_DEVICE FT_INLINE int32_t lut_key_from_bits(uint32_t bits) {
  const int32_t sign = static_cast<int32_t>(bits >> 31);
  const int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xFF);
  int32_t binade = exponent - (127 - kLutBinades);
  int32_t mantissa = static_cast<int32_t>((bits >> (23 - kLutMantissaBits)) & ((1u << kLutMantissaBits) - 1));
  if (binade < 0 || binade >= kLutBinades) mantissa = 0;
  binade = binade < 0 ? 0 : (binade > kLutBinades ? kLutBinades : binade);
  return sign * kLutCellsPerSign + (binade << kLutMantissaBits) + mantissa;
}

FT_HOST_DEVICE FT_INLINE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// The code of x in [-1, 1] (x = s * (1/absmax)); NaN gives 0 (the block's NaN absmax carries the NaN).
FT_HOST_DEVICE FT_INLINE uint8_t quantize_value(float x, const float* boundary, const uint8_t* lut) {
  const int32_t low = lut[lut_key_from_bits(float_bits(x))];
  return static_cast<uint8_t>(low + (x > boundary[low] ? 1 : 0));
}

// 1/absmax, or 0 for an all-zero block (every element then gets the code of 0). A NaN or inf absmax gives
// NaN or 0 here; either way the block dequantizes to non-finite values, as the moments were.
FT_HOST_DEVICE FT_INLINE float inverse_absmax(float absmax) { return absmax > 0.0f ? 1.0f / absmax : 0.0f; }

// Builds the signed or unsigned dynamic code, its midpoints and the lookup table. Host-side, once per process.
inline void build_dynamic_code(DynamicCode& code, bool is_signed) {
  const double decade[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
  float values[256];
  int n = 0;
  for (int i = 0; i < 7; ++i) {
    const int points = is_signed ? (1 << i) : (2 << i);
    for (int k = 0; k < points; ++k) {
      const float v = static_cast<float>(decade[i] * (0.1 + (k + 0.5) * 0.9 / points));
      values[n++] = v;
      if (is_signed) values[n++] = -v;
    }
  }
  values[n++] = 0.0f;
  values[n++] = 1.0f;
  // insertion sort: 256 values, once
  for (int i = 1; i < 256; ++i) {
    const float v = values[i];
    int j = i - 1;
    for (; j >= 0 && values[j] > v; --j) values[j + 1] = values[j];
    values[j + 1] = v;
  }
  for (int i = 0; i < 256; ++i) code.value[i] = values[i];
  for (int i = 0; i < 255; ++i) code.boundary[i] = (values[i] + values[i + 1]) * 0.5f;
  code.boundary[255] = __builtin_inff();
  code.is_signed = is_signed;

  // Each cell's smallest code: that of its most negative member (its lowest magnitude for x >= 0, its
  // highest for x < 0, approached from inside the cell).
  auto count_below = [&](float x, bool strictly) {
    int c = 0;
    while (c < 255 && (strictly ? code.boundary[c] < x : code.boundary[c] <= x)) ++c;
    return c;
  };
  code.valid = true;
  for (int sign = 0; sign < 2; ++sign) {
    for (int binade = 0; binade <= kLutBinades; ++binade) {
      for (int m = 0; m < (1 << kLutMantissaBits); ++m) {
        const int key = sign * kLutCellsPerSign + (binade << kLutMantissaBits) + m;
        double low = 0.0, high = 0.0;  // magnitudes: [low, high) for binades inside the table
        const double base = std::ldexp(1.0, binade - kLutBinades);
        if (binade == kLutBinades) {
          low = 1.0;
          high = 1e30;  // 1 and above (also inf, NaN: any code will do)
        } else {
          low = (binade == 0 && m == 0) ? 0.0 : base * (1.0 + m / double(1 << kLutMantissaBits));
          high = base * (1.0 + (m + 1) / double(1 << kLutMantissaBits));
        }
        // x in the cell: [low, high) for sign 0, (-high, -low] for sign 1.
        const float most_negative = sign == 0 ? static_cast<float>(low) : -static_cast<float>(high);
        const int smallest = sign == 0 ? count_below(most_negative, true) : count_below(most_negative, false);
        code.lut[key] = static_cast<uint8_t>(smallest);
        // At most one midpoint may lie inside the cell above the smallest code's range.
        const float most_positive = sign == 0 ? static_cast<float>(high) : -static_cast<float>(low);
        int inside = 0;
        for (int j = smallest; j < 255; ++j) {
          if (code.boundary[j] < most_positive) ++inside;
        }
        if (binade != kLutBinades && inside > 1) code.valid = false;
      }
    }
  }
  for (int i = 0; i < 4; ++i) code.lut[kLutSize + i] = 0;
}

}  // namespace math
}  // namespace fused_train
