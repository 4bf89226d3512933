// Torch-free tests of the 8-bit quantization (csrc/include/fused_train/quant_math.h): the code's shape, and
// quantize_value against a brute-force nearest-value search over all 256 values, at every midpoint and its fp32
// neighbours and at millions of random points over 30 decades.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "fused_train/quant_math.h"

namespace math = fused_train::math;

namespace {

// The nearest value by distance, in double; the lower code on a tie.
int nearest(const math::DynamicCode& c, float x) {
  int best = 0;
  for (int k = 1; k < 256; ++k) {
    if (std::fabs(double(x) - c.value[k]) < std::fabs(double(x) - c.value[best])) best = k;
  }
  return best;
}

// quantize_value agrees with nearest() except where x is within fp32 rounding of a midpoint.
void check_against_nearest(const math::DynamicCode& c, float x) {
  const int got = math::quantize_value(x, c);
  const int want = nearest(c, x);
  if (got == want) {
    FT_CHECK(true);
    return;
  }
  FT_CHECK(std::abs(got - want) == 1);
  const double midpoint = (double(c.value[got]) + c.value[want]) / 2;
  FT_CHECK(std::fabs(x - midpoint) <= 1e-6 * std::fabs(midpoint));
}

void check_code(bool is_signed) {
  const math::DynamicCode& c = is_signed ? math::kSignedCode : math::kUnsignedCode;
  FT_CHECK(c.is_signed == is_signed);
  for (int k = 1; k < 256; ++k) FT_CHECK(c.value[k - 1] < c.value[k]);
  FT_CHECK(c.value[255] == 1.0f);
  FT_CHECK(c.value[is_signed ? 127 : 0] == 0.0f);
  for (int k = 0; k < 256; ++k) FT_CHECK(math::quantize_value(c.value[k], c) == k);
  for (int k = 0; k < 255; ++k) {
    const float mid = (c.value[k] + c.value[k + 1]) * 0.5f;
    check_against_nearest(c, mid);
    check_against_nearest(c, std::nextafter(mid, 2.0f));
    check_against_nearest(c, std::nextafter(mid, -2.0f));
  }
  std::mt19937 rng(is_signed ? 1 : 2);
  std::uniform_real_distribution<float> uniform(is_signed ? -1.0f : 0.0f, 1.0f), exponent(-30.0f, 0.0f);
  for (int i = 0; i < 200000; ++i) {
    check_against_nearest(c, uniform(rng));
    const float m = std::pow(10.0f, exponent(rng));
    check_against_nearest(c, is_signed && (i & 1) ? -m : m);
  }
  // 0, -0, past 1 (x = s * (1/absmax) may exceed 1 by an ulp), and NaN (the code of 0)
  FT_CHECK(math::quantize_value(0.0f, c) == (is_signed ? 127 : 0));
  FT_CHECK(math::quantize_value(-0.0f, c) == (is_signed ? 127 : 0));
  FT_CHECK(math::quantize_value(std::nextafter(1.0f, 2.0f), c) == 255);
  if (is_signed) FT_CHECK(math::quantize_value(-std::nextafter(1.0f, 2.0f), c) == 0);
  FT_CHECK(math::quantize_value(std::nanf(""), c) == (is_signed ? 127 : 0));
}

FT_TEST(signed_code) { check_code(true); }
FT_TEST(unsigned_code) { check_code(false); }

// The binade lookup (the AVX-512 kernels' form) gives quantize_value's code for every magnitude below 4, NaN and
// -0: every 61st float bit pattern of [0, 4) with both signs, and each threshold and value with its 4 fp32
// neighbours on either side.
void check_binade_lookup(bool is_signed) {
  const math::DynamicCode& c = is_signed ? math::kSignedCode : math::kUnsignedCode;
  const math::BinadeCode& t = is_signed ? math::kSignedBinade : math::kUnsignedBinade;
  auto same = [&](float x) { FT_CHECK(math::quantize_value_by_binade(x, c, t) == math::quantize_value(x, c)); };
  auto from_bits = [](uint32_t bits) {
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
  };
  int64_t checked = 0;
  for (uint32_t bits = 0; bits < 0x40800000u; bits += 61, ++checked) {  // 0x40800000: 4.0f
    same(from_bits(bits));
    if (is_signed) same(-from_bits(bits));
  }
  FT_CHECK(checked > 17000000);
  auto around = [&](float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    for (int d = -4; d <= 4; ++d) {
      same(from_bits(bits + d));
      if (is_signed) same(-from_bits(bits + d));
    }
  };
  for (float threshold : c.threshold) around(threshold);
  for (float value : c.value) {
    if (value > 0.0f) around(value);
  }
  same(0.0f);
  same(-0.0f);
  same(std::nanf(""));
  same(-std::nanf(""));
  same(1e-30f);
  same(1e-40f);  // subnormal
}

FT_TEST(signed_code_binade_lookup) { check_binade_lookup(true); }
FT_TEST(unsigned_code_binade_lookup) { check_binade_lookup(false); }

FT_TEST(inverse_absmax) {
  FT_CHECK(math::inverse_absmax(0.0f) == 0.0f);
  FT_CHECK(math::inverse_absmax(4.0f) == 0.25f);
  FT_CHECK(math::inverse_absmax(std::nanf("")) == 0.0f);
  // below the smallest normal float 1/absmax would overflow: such a block is stored as zeros
  FT_CHECK(math::inverse_absmax(1e-39f) == 0.0f);
  FT_CHECK(math::inverse_absmax(1.17549435e-38f) > 0.0f);
}

// The blocks of rows: they tile each row in order (the last one shorter), never cross a row, are numbered rows after
// rows, and chunks of any size own each block exactly once (the one holding its first element), so that the CPU's
// threads and the GPU's blocks never update a block twice or leave one out.
FT_TEST(quant_rows_tile_the_rows_and_chunks_own_each_block_once) {
  const int64_t rows_list[] = {1, 2, 3, 7};
  const int64_t row_list[] = {1, 5, 255, 256, 257, 300, 511, 512, 576, 896, 960, 1000, 2048};
  const int64_t chunk_list[] = {1, 100, 256, 512, 777, 32768};
  for (int64_t rows : rows_list) {
    for (int64_t row : row_list) {
      const math::QuantRows q = math::QuantRows::of(row);
      const int64_t numel = rows * row;
      const int64_t blocks = rows * q.blocks_per_row;
      FT_CHECK(q.blocks_per_row == (row + 255) / 256);
      FT_CHECK(q.blocks_before(0) == 0 && q.blocks_before(numel) == blocks);
      int64_t next = 0;  // the element the next block must start at
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = q.start(b), size = q.size(b);
        FT_CHECK(start == next);
        FT_CHECK(size >= 1 && size <= 256);
        FT_CHECK(start / row == b / q.blocks_per_row && (start + size - 1) / row == start / row);  // within its row
        FT_CHECK(q.blocks_before(start) == b && q.blocks_before(start + 1) == b + 1);
        next = start + size;
      }
      FT_CHECK(next == numel);
      if (row % 256 == 0 || rows == 1) {  // the flat layout: block b starts at b * 256
        for (int64_t b = 0; b < blocks; ++b) FT_CHECK(q.start(b) == b * 256);
      }
      for (int64_t chunk : chunk_list) {
        std::vector<int> owners(static_cast<size_t>(blocks), 0);
        for (int64_t begin = 0; begin < numel; begin += chunk) {
          const int64_t end = begin + chunk < numel ? begin + chunk : numel;
          for (int64_t b = q.blocks_before(begin); b < q.blocks_before(end); ++b) {
            FT_CHECK(q.start(b) >= begin && q.start(b) < end);
            ++owners[static_cast<size_t>(b)];
          }
        }
        for (int owner : owners) FT_CHECK(owner == 1);
      }
    }
  }
  FT_CHECK(math::QuantRows::of(0).row == 1);  // an empty tensor: no blocks, and no division by zero
}

}  // namespace

int main(int argc, char** argv) { return ft_test::run_tests(argc > 1 ? argv[1] : ""); }
