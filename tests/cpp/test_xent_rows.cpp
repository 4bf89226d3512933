// Torch-free, CUDA-free tests of how the CUDA cross-entropy kernels read a row (csrc/cuda/row_runs.h) and fold it
// (math::accumulate_run and math::combine, csrc/include/fused_train/xent_math.h), run here on the CPU:
//  * for_each_run: over every start alignment, many lengths and every group size the kernels use, each element
//    of the row is visited exactly once by exactly one lane, and every vector is 16-byte aligned and holds the
//    row's elements;
//  * a group's row state, each lane folding its runs and the lanes combined in the kernels' butterfly order,
//    gives the row's log-sum-exp and linear term of a double-precision reference, identically in every lane;
//  * -inf, +inf and NaN logits give the states the loss's semantics need (finish_row: NaN for +inf and NaN).
// The GPU's exp differs (xent_math.h's exp_); the traversal and the folding are the same code.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "cuda/row_runs.h"
#include "fused_train/xent_math.h"

namespace ft = fused_train::cuda;
namespace math = fused_train::math;

namespace {

constexpr int kGroups[] = {1, 2, 4, 8, 16, 32, 512};
// Up to 17000: a block of 512 threads reaches its kPacksInFlight loop from 2048 vectors (fp32 8192 elements,
// two-byte types 16384).
constexpr int64_t kLengths[] = {0,   1,   2,   3,   4,   5,    7,    8,    9,    15,   16,  17,
                                31,  32,  33,  63,  64,  65,   127,  128,  129,  255,  257, 1000,
                                2049, 4097, 9000, 17000};

// Every element of rows of every length at every start alignment: visited once, vectors aligned and whole.
template <class T>
void check_visits() {
  constexpr int K = ft::Pack<T>::kSize;
  std::vector<T> storage(17000 + 16);
  for (size_t i = 0; i < storage.size(); ++i) storage[i] = static_cast<T>(i % 251);
  for (int offset = 0; offset < 16 / static_cast<int>(sizeof(T)); ++offset) {
    // storage's data is at least 16-byte aligned (operator new); offset moves the row off the boundary.
    const T* p = storage.data() + offset;
    for (const int64_t n : kLengths) {
      for (const int group : kGroups) {
        std::vector<int> visits(static_cast<size_t>(n), 0);
        bool aligned = true, contents = true, in_range = true;
        for (int lane = 0; lane < group; ++lane) {
          ft::for_each_run(
              p, n, lane, group,
              [&](int64_t j) {
                in_range = in_range && j >= 0 && j < n;
                if (j >= 0 && j < n) ++visits[j];
              },
              [&](int64_t j, const ft::Pack<T>& pack) {
                aligned = aligned && reinterpret_cast<uintptr_t>(p + j) % 16 == 0;
                for (int k = 0; k < K; ++k) {
                  in_range = in_range && j + k >= 0 && j + k < n;
                  if (j + k >= 0 && j + k < n) {
                    ++visits[j + k];
                    contents = contents && std::memcmp(&pack.v[k], p + j + k, sizeof(T)) == 0;
                  }
                }
              });
        }
        int64_t wrong = 0;
        for (const int v : visits) wrong += v != 1;
        FT_CHECK_MSG(wrong == 0 && in_range, "sizeof(T) ", sizeof(T), ", offset ", offset, ", n ", n, ", group ",
                     group, ": ", wrong, " elements not visited exactly once");
        FT_CHECK_MSG(aligned && contents, "sizeof(T) ", sizeof(T), ", offset ", offset, ", n ", n, ", group ", group,
                     ": a vector misaligned or not holding the row's elements");
      }
    }
  }
}

FT_TEST(each_element_once_float) { check_visits<float>(); }
FT_TEST(each_element_once_double) { check_visits<double>(); }
FT_TEST(each_element_once_two_bytes) { check_visits<uint16_t>(); }  // bf16 and fp16 rows

// The state a group of `group` lanes ends with for row x (coefficients a): each lane folds its runs with
// accumulate_run, then the lanes combine as group_combine does (lane ^ offset, offset = group/2 ... 1). Returns
// lane 0's state and checks that every lane holds the same bits.
template <bool Linear>
math::RowState<float> group_state(const std::vector<float>& x, const std::vector<float>& a, int offset, int group) {
  constexpr int K = ft::Pack<float>::kSize;
  std::vector<float> row(x.size() + 4);
  std::vector<float> coef(x.size() + 4);
  std::copy(x.begin(), x.end(), row.begin() + offset);
  std::copy(a.begin(), a.end(), coef.begin() + offset);
  const float* p = row.data() + offset;
  const float* c = coef.data() + offset;
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<math::RowState<float>> lanes(group, math::empty_row_state<float>());
  for (int lane = 0; lane < group; ++lane) {
    math::RowState<float>& st = lanes[lane];
    ft::for_each_run(
        p, n, lane, group, [&](int64_t j) { math::accumulate_run<Linear, 1>(st, p + j, c + j); },
        [&](int64_t j, const ft::Pack<float>& pack) {
          float xs[K];
          std::memcpy(xs, pack.v, sizeof(xs));
          math::accumulate_run<Linear, K>(st, xs, c + j);
        });
  }
  for (int step = group / 2; step > 0; step /= 2) {
    std::vector<math::RowState<float>> next(lanes);
    for (int lane = 0; lane < group; ++lane) next[lane] = math::combine(lanes[lane], lanes[lane ^ step]);
    lanes = next;
  }
  for (int lane = 1; lane < group; ++lane) {
    const bool same = std::memcmp(&lanes[lane], &lanes[0], sizeof(lanes[0])) == 0;
    FT_CHECK_MSG(same, "lane ", lane, " of ", group, " ends with another state than lane 0");
  }
  return lanes[0];
}

// Rows of random logits (spread and offset at several scales, some -inf) against log-sum-exp and
// Σ a·(lse - x) in double, for every group size and alignment.
FT_TEST(group_state_matches_double) {
  std::mt19937 rng(1234);
  const float inf = std::numeric_limits<float>::infinity();
  for (const int64_t n : {1, 3, 8, 21, 100, 1000, 4099}) {
    for (const float spread : {0.1f, 3.0f, 30.0f}) {
      for (const float shift : {0.0f, -50.0f, 1e4f}) {
        std::normal_distribution<float> logit(shift, spread);
        std::uniform_real_distribution<float> unit(0.0f, 1.0f);
        std::vector<float> x(n), a(n);
        for (int64_t j = 0; j < n; ++j) {
          x[j] = (n > 3 && unit(rng) < 0.05f) ? -inf : logit(rng);
          a[j] = unit(rng);
        }
        double m = -inf;
        for (const float v : x) m = std::max(m, static_cast<double>(v));
        double s = 0;
        for (const float v : x) s += std::exp(static_cast<double>(v) - m);
        const double lse = m + std::log(s);
        double linear = 0, asum = 0;
        for (int64_t j = 0; j < n; ++j) {
          if (x[j] != -inf) linear += a[j] * (lse - x[j]);
          asum += a[j];
        }
        for (const int group : kGroups) {
          for (const int offset : {0, 1, 3}) {
            const math::RowState<float> plain = group_state<false>(x, a, offset, group);
            const math::RowLse<float> r = math::finish_row(plain);
            // lse - shift is ~log n in float: relative 1e-6 of it, plus the shift's own ulp.
            FT_CHECK_CLOSE(static_cast<double>(r.shift) + r.log_sum, lse, 2e-7, 2e-6 * std::log(n + 1.0));
            FT_CHECK_MSG(plain.dot == 0 && plain.asum == 0, "no linear term without Linear");
            if (std::count(x.begin(), x.end(), -inf) == 0) {  // a -inf logit makes a·(x - m) -inf
              const math::RowState<float> lin = group_state<true>(x, a, offset, group);
              const math::RowLse<float> rl = math::finish_row(lin);
              FT_CHECK_CLOSE(rl.log_sum, r.log_sum, 1e-6, 1e-6);
              FT_CHECK_CLOSE(lin.asum, asum, 1e-5, 1e-6);
              // The kernels' linear term relative to their own lse: a·(lse - x) summed, each ~a·(lse - m + spread).
              FT_CHECK_CLOSE(math::linear_term(lin, rl), linear, 2e-5, 1e-4 * asum);
            }
          }
        }
      }
    }
  }
}

// Rows with infinities and NaN: the state and finish_row give what the loss needs, for every group size.
FT_TEST(group_state_special_values) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (const int group : kGroups) {
    for (const int64_t n : {1, 5, 37}) {
      const std::vector<float> ones(n, 1.0f);
      // Every logit -inf: max -inf, sum 0 (no NaN from -inf - -inf), log_sum -inf.
      const math::RowState<float> neg = group_state<true>(std::vector<float>(n, -inf), ones, 1, group);
      FT_CHECK_MSG(neg.max == -inf && neg.sum == 0 && neg.asum == n, "all -inf, group ", group);
      FT_CHECK(math::finish_row(neg).log_sum == -inf);
      for (int64_t at = 0; at < n; at += (n > 5 ? 7 : 1)) {
        std::vector<float> x(n, 2.0f);
        if (n > 2) x[(at + 1) % n] = -inf;
        x[at] = inf;  // +inf: log_sum NaN (torch: exp(inf - inf))
        FT_CHECK_MSG(std::isnan(math::finish_row(group_state<false>(x, ones, 0, group)).log_sum), "+inf at ", at,
                     " of ", n, ", group ", group);
        FT_CHECK(std::isnan(math::finish_row(group_state<true>(x, ones, 2, group)).log_sum));
        x[at] = nan;  // NaN: log_sum NaN whatever its place in a run
        FT_CHECK_MSG(std::isnan(math::finish_row(group_state<false>(x, ones, 3, group)).log_sum), "NaN at ", at,
                     " of ", n, ", group ", group);
        const math::RowState<float> lin = group_state<true>(x, ones, 0, group);
        FT_CHECK(std::isnan(math::finish_row(lin).log_sum) && std::isnan(math::linear_term(lin, math::finish_row(lin))));
      }
      // A NaN in a run before the row's max, which arrives in a later run: the rescale keeps the sum NaN.
      std::vector<float> later(n + 40, 1.0f);
      later[0] = nan;
      later[n + 39] = 100.0f;
      FT_CHECK_MSG(std::isnan(math::finish_row(group_state<true>(later, std::vector<float>(n + 40, 1.0f), 1, group))
                                  .log_sum),
                   "NaN before a larger max, group ", group);
      // One finite logit among -inf: exactly that logit's lse (sum 1).
      std::vector<float> x(n, -inf);
      x[n / 2] = -3.5f;
      const math::RowState<float> one = group_state<true>(x, ones, 1, group);
      FT_CHECK_MSG(one.max == -3.5f && one.sum == 1.0f, "one finite logit, group ", group, ": max ", one.max, " sum ",
                   one.sum);
    }
  }
}

}  // namespace

int main(int argc, char** argv) { return ft_test::run_tests(argc > 1 ? argv[1] : ""); }
