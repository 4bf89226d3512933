// Torch-free tests of bf16 stochastic rounding (csrc/include/fused_train/stochastic_round.h): each result is one of
// x's two bf16 neighbours, the choice follows the random bits exactly, the average over all 2^16 bit patterns is x
// itself, special values survive, and the counter-based bits look uniform along elements and along steps.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "check.h"
#include "fused_train/stochastic_round.h"

namespace math = fused_train::math;

namespace {

float truncate_to_bf16(float x) { return math::bits_float(math::float_bits(x) & 0xffff0000u); }
// The bf16 neighbour of x one step further from zero than the truncation.
float next_bf16_up(float x) { return math::bits_float((math::float_bits(x) & 0xffff0000u) + 0x10000u); }

// Rounding with r as the high 16 bits of the random word.
float round_with(float x, uint32_t r) { return math::round_to_bf16_stochastic(x, r << 16); }

}  // namespace

FT_TEST(bf16_values_are_kept) {
  for (float x : {0.0f, -0.0f, 1.0f, -2.5f, 3.0e38f, 1.0e-38f, 0.15625f}) {
    const float exact = truncate_to_bf16(x);
    for (uint32_t r : {0u, 1u, 32768u, 65535u}) {
      FT_CHECK(math::float_bits(round_with(exact, r)) == math::float_bits(exact));
    }
  }
}

FT_TEST(result_is_a_neighbour_chosen_by_the_bits) {
  // x = 1 + 3·2^-16 (low bits 0x0180 = 384 of 65536): rounds up exactly when r >= 65536 - 384.
  for (float x : {1.0f + 3.0f / 65536.0f, -(1.0f + 3.0f / 65536.0f), 7.77e-3f, -123456.7f, 1.0e-40f}) {
    const uint32_t low = math::float_bits(x) & 0xffffu;
    FT_CHECK(low != 0);
    const float down = truncate_to_bf16(x), up = next_bf16_up(x);
    FT_CHECK(round_with(x, 65535u - low) == down);
    FT_CHECK(round_with(x, 65536u - low) == up);
    FT_CHECK(round_with(x, 0u) == down);
    FT_CHECK(round_with(x, 65535u) == up);
    // magnitudes move away from zero or toward it, alike for both signs
    FT_CHECK(round_with(-x, 1000u) == -round_with(x, 1000u));
  }
}

FT_TEST(average_over_all_bits_is_x) {
  // Σ_r round(x, r) = (65536 - low)·down + low·up = 65536·x, exactly in double.
  for (float x : {1.0f + 1.0f / 3.0f, -0.7f, 3.3e-5f, 2.0e30f, 1.17e-38f}) {
    double sum = 0.0;
    for (uint32_t r = 0; r < 65536u; ++r) sum += round_with(x, r);
    FT_CHECK_CLOSE(sum / 65536.0, static_cast<double>(x), 1e-15, 0.0);
  }
}

FT_TEST(special_values) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (uint32_t r : {0u, 65535u}) {
    FT_CHECK(round_with(inf, r) == inf);
    FT_CHECK(round_with(-inf, r) == -inf);
    FT_CHECK(std::isnan(round_with(nan, r)));
    // a NaN whose payload is all in the low bits: truncating it would give inf
    FT_CHECK(std::isnan(round_with(math::bits_float(0x7f800001u), r)));
    FT_CHECK(std::isnan(round_with(math::bits_float(0xffffffffu), r)));
  }
  // the largest float: inf with the probability of its distance past the largest bf16
  const float max = std::numeric_limits<float>::max();
  FT_CHECK(round_with(max, 0u) == truncate_to_bf16(max));
  FT_CHECK(round_with(max, 65535u) == inf);
}

FT_TEST(bits_are_uniform_along_elements) {
  // The top byte of 2^20 consecutive elements' bits over 256 bins: chi-square with 255 degrees of freedom stays
  // below 350 (p ≈ 1e-4) for a uniform source; the rounding's 16 bits have mean 0.5.
  const uint64_t stream = math::rounding_stream(0x1234, 7.0);
  const uint32_t key = math::rounding_key(stream, 0);
  std::vector<double> bins(256, 0.0);
  double mean = 0.0;
  const uint32_t n = 1u << 20;
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t bits = math::rounding_bits(key, i);
    bins[bits >> 24] += 1;
    mean += (bits >> 16) / 65536.0;
  }
  double chi2 = 0.0;
  for (double b : bins) chi2 += (b - n / 256.0) * (b - n / 256.0) / (n / 256.0);
  FT_CHECK_MSG(chi2 < 350.0, "chi2 ", chi2);
  FT_CHECK_CLOSE(mean / n, 0.5, 0.0, 2e-3);
}

FT_TEST(bits_are_uniform_along_steps) {
  // One element's bits over 2^18 steps, and neighbouring elements' bits at one step, do not repeat each other.
  std::vector<double> bins(256, 0.0);
  const uint32_t n = 1u << 18;
  long equal_neighbours = 0;
  for (uint32_t t = 1; t <= n; ++t) {
    const uint32_t key = math::rounding_key(math::rounding_stream(-42, static_cast<double>(t)), 0);
    const uint32_t bits = math::rounding_bits(key, 5);
    bins[bits >> 24] += 1;
    equal_neighbours += (bits >> 16) == (math::rounding_bits(key, 6) >> 16) ? 1 : 0;
  }
  double chi2 = 0.0;
  for (double b : bins) chi2 += (b - n / 256.0) * (b - n / 256.0) / (n / 256.0);
  FT_CHECK_MSG(chi2 < 350.0, "chi2 ", chi2);
  FT_CHECK(equal_neighbours < 20);  // 16-bit collisions: 4 expected
}

FT_TEST(streams_differ_by_seed_step_and_range) {
  FT_CHECK(math::rounding_stream(1, 1.0) != math::rounding_stream(1, 2.0));
  FT_CHECK(math::rounding_stream(1, 1.0) != math::rounding_stream(2, 1.0));
  const uint64_t s = math::rounding_stream(1, 1.0);
  FT_CHECK(math::rounding_key(s, 0) != math::rounding_key(s, 1));
  // a step that is no count (negative, NaN) counts as 0
  FT_CHECK(math::rounding_stream(3, -1.0) == math::rounding_stream(3, 0.0));
  FT_CHECK(math::rounding_stream(3, std::nan("")) == math::rounding_stream(3, 0.0));
  // Seeds are splitmix64 outputs of positions (mix64(position + golden)): param p at step t must not draw param
  // t's bits at step p, and no step may cancel a seed to a zero stream.
  const auto position_seed = [](uint64_t p) { return static_cast<int64_t>(math::mix64(p + 0x9e3779b97f4a7c15ull)); };
  for (uint64_t p = 0; p < 40; ++p) {
    for (uint64_t t = 1; t < 40; ++t) {
      if (p != t) {
        FT_CHECK(math::rounding_stream(position_seed(p), double(t)) !=
                 math::rounding_stream(position_seed(t), double(p)));
      }
      FT_CHECK(math::rounding_stream(position_seed(p), double(t)) != 0);
    }
  }
}

FT_TEST(run_rounding_is_the_bits_of_the_runs_elements) {
  // The kernels' runs (a tile, a block, a chunk) start anywhere, also past 2^32: element i of a run from `first`
  // draws the bits of element first + i.
  const uint64_t stream = math::rounding_stream(99, 3.0);
  for (int64_t first : {int64_t{0}, int64_t{512}, (int64_t{1} << 32) + 65536, (int64_t{5} << 32)}) {
    const math::RunRounding run = math::RunRounding::make(true, stream, first);
    for (int64_t i : {0, 1, 255}) {
      const int64_t index = first + i;
      const uint32_t want = math::rounding_bits(math::rounding_key(stream, static_cast<uint32_t>(index >> 32)),
                                                static_cast<uint32_t>(index));
      FT_CHECK(run.bits(i) == want);
      const float x = 1.0f + 1.0f / 3.0f;
      FT_CHECK(run.apply(x, i) == math::round_to_bf16_stochastic(x, want));
    }
  }
  // A run may cross a multiple of 2^32 (a shard's offset puts it anywhere): each element still draws the bits of
  // its own index, the key changing at the crossing, and the same past 2^64 (indices count modulo 2^64).
  for (uint64_t first : {(uint64_t{1} << 32) - 3, (uint64_t{7} << 32) - 1, ~uint64_t{0} - 1, uint64_t{12345}}) {
    const math::RunRounding run = math::RunRounding::make(true, stream, first);
    for (int64_t i = 0; i < 300; ++i) {
      const uint64_t index = first + static_cast<uint64_t>(i);
      const uint32_t want = math::rounding_bits(math::rounding_key(stream, static_cast<uint32_t>(index >> 32)),
                                                static_cast<uint32_t>(index));
      FT_CHECK_MSG(run.bits(i) == want, "run from ", first, ", element ", i);
      FT_CHECK(run.bits(i) == math::RunRounding::make(true, stream, index).bits(0));
    }
  }
  // off (or default), and for double: values pass through
  const float x = 1.0f + 1.0f / 3.0f;
  FT_CHECK(math::RunRounding{}.apply(x, 7) == x);
  FT_CHECK(math::RunRounding::make(false, stream, 0).apply(x, 7) == x);
  FT_CHECK(math::RunRounding::make(true, stream, 0).apply(1.0 / 3.0, 7) == 1.0 / 3.0);
}

int main(int argc, char** argv) { return ft_test::run_tests(argc > 1 ? argv[1] : ""); }
