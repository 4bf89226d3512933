// The memory-bandwidth ceiling of an optimizer step's access pattern, for bench_optimizers.py (and of a one-pass
// loss's, copy_pass_ at the end, for bench_segmentation_loss.py).
//
// One pass over a list of tensors that reads and writes exactly the streams an optimizer step does per
// element (the param and its states read and written, the gradient read, and written as zero when the
// step zeroes it), with trivial arithmetic, so it is bound by memory alone. A kernel's GB/s as a share
// of this pass's GB/s, on tensors of the same shapes and with the same threads, says how close the
// kernel comes to what the machine allows for its pattern.
//
// Plain code on purpose: one at::parallel_for over all elements of all tensors (one fork per call, like
// the fused kernels), a simple loop the compiler vectorizes (-O3 -march=native), ordinary stores (no
// non-temporal hints: the fused kernels use none). Per element, with P the param, G the gradient and
// S_k the fp32 states:
//   P = P + G (in P's storage type: fp32, or the raw 16 bits of a bf16 value), S_k = S_k + float(G),
//   G = 0 when zero_grad.
// Every result is stored, so no work can be dropped; tests/test_benchmarks.py checks the values.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

namespace {

constexpr int kMaxStates = 3;

// The gradient's value as the states add it: the float itself, or the bf16 bits as a small integer.
inline float as_float(float g) { return g; }
inline float as_float(uint16_t g) { return static_cast<float>(g); }

template <class T, int K, bool kZero>
void stream_range(int64_t n, T* __restrict__ p, T* __restrict__ g, float* __restrict__ s0,
                  float* __restrict__ s1, float* __restrict__ s2) {
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    const float gf = as_float(gi);
    p[i] = static_cast<T>(p[i] + gi);
    if constexpr (K > 0) s0[i] += gf;
    if constexpr (K > 1) s1[i] += gf;
    if constexpr (K > 2) s2[i] += gf;
    if constexpr (kZero) g[i] = T(0);
  }
}

template <class T, int K>
void stream_range(bool zero, int64_t n, T* p, T* g, float* const* s) {
  if (zero) {
    stream_range<T, K, true>(n, p, g, s[0], s[1], s[2]);
  } else {
    stream_range<T, K, false>(n, p, g, s[0], s[1], s[2]);
  }
}

template <class T>
void stream_range(int k, bool zero, int64_t n, T* p, T* g, float* const* s) {
  switch (k) {
    case 0: return stream_range<T, 0>(zero, n, p, g, s);
    case 1: return stream_range<T, 1>(zero, n, p, g, s);
    case 2: return stream_range<T, 2>(zero, n, p, g, s);
    default: return stream_range<T, 3>(zero, n, p, g, s);
  }
}

// One contiguous piece of work: a param with its grad and states.
template <class T>
struct Stream {
  T* p;
  T* g;
  float* s[kMaxStates];
};

template <class T>
void timed_passes(const std::vector<Stream<T>>& streams, const std::vector<int64_t>& offsets, int k,
                  bool zero_grad, std::vector<double>& seconds) {
  const int64_t n = static_cast<int64_t>(streams.size());
  for (double& sec : seconds) {
    const auto start = std::chrono::steady_clock::now();
    // One parallel_for over every element of every tensor; each thread walks the tensors its range covers.
    at::parallel_for(0, offsets[n], 1 << 15, [&](int64_t begin, int64_t end) {
      int64_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
      for (; i < n && offsets[i] < end; ++i) {
        const int64_t lo = std::max(begin, offsets[i]) - offsets[i];
        const int64_t hi = std::min(end, offsets[i + 1]) - offsets[i];
        if (hi <= lo) continue;
        const Stream<T>& st = streams[i];
        float* s[kMaxStates] = {nullptr, nullptr, nullptr};
        for (int j = 0; j < k; ++j) s[j] = st.s[j] + lo;
        stream_range<T>(k, zero_grad, hi - lo, st.p + lo, st.g + lo, s);
      }
    });
    sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
}

template <class T, class S>
std::vector<Stream<T>> collect(at::TensorList params, at::TensorList grads, at::TensorList states, int k) {
  const size_t n = params.size();
  std::vector<Stream<T>> streams(n);
  for (size_t i = 0; i < n; ++i) {
    streams[i].p = reinterpret_cast<T*>(params[i].data_ptr<S>());
    streams[i].g = reinterpret_cast<T*>(grads[i].data_ptr<S>());
    for (int j = 0; j < kMaxStates; ++j) streams[i].s[j] = j < k ? states[j * n + i].data_ptr<float>() : nullptr;
  }
  return streams;
}

// params, grads: n tensors of one dtype (float32 or bfloat16); states: k·n float32 tensors, state j of
// tensor i at states[j·n + i]. All contiguous, each state and grad the size of its param. Runs `repeat`
// passes and returns the seconds of each, timed here so that the call's own cost (the lists crossing
// from Python) is not in them: this is the memory's ceiling, not the host's.
std::vector<double> streaming_pass_(at::TensorList params, at::TensorList grads, at::TensorList states,
                                    bool zero_grad, int64_t repeat) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(n > 0 && static_cast<int64_t>(grads.size()) == n, "streaming_pass_: params and grads must be ",
              "non-empty lists of the same length");
  TORCH_CHECK(static_cast<int64_t>(states.size()) % n == 0, "streaming_pass_: states must hold k tensors per param");
  TORCH_CHECK(repeat >= 1, "streaming_pass_: repeat must be at least 1, got ", repeat);
  const int k = static_cast<int>(static_cast<int64_t>(states.size()) / n);
  TORCH_CHECK(k <= kMaxStates, "streaming_pass_: at most ", kMaxStates, " states per param");
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "streaming_pass_: params must be float32 or bfloat16");
  std::vector<int64_t> offsets(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    TORCH_CHECK(params[i].is_cpu() && params[i].is_contiguous() && params[i].scalar_type() == dtype,
                "streaming_pass_: params[", i, "] must be a contiguous CPU tensor of the list's dtype");
    TORCH_CHECK(grads[i].is_cpu() && grads[i].is_contiguous() && grads[i].scalar_type() == dtype &&
                    grads[i].numel() == numel,
                "streaming_pass_: grads[", i, "] must match its param");
    for (int j = 0; j < k; ++j) {
      const at::Tensor& s = states[j * n + i];
      TORCH_CHECK(s.is_cpu() && s.is_contiguous() && s.scalar_type() == at::kFloat && s.numel() == numel,
                  "streaming_pass_: states[", j * n + i,
                  "] must be a contiguous float32 tensor of its param's size");
    }
    offsets[i + 1] = offsets[i] + numel;
  }
  std::vector<double> seconds(static_cast<size_t>(repeat));
  if (dtype == at::kFloat) {
    timed_passes(collect<float, float>(params, grads, states, k), offsets, k, zero_grad, seconds);
  } else {
    timed_passes(collect<uint16_t, at::BFloat16>(params, grads, states, k), offsets, k, zero_grad, seconds);
  }
  return seconds;
}

// The pattern of a one-pass loss (bench_segmentation_loss.py): one stream read (the logits), one written (their
// gradient), out[i] = in[i] + 1 in the storage type (fp32, or the raw 16 bits of a bf16 value). Returns the
// seconds of each of `repeat` passes, timed here as streaming_pass_'s.
template <class T>
void copy_range(int64_t n, const T* __restrict__ in, T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i] + 1);
}

std::vector<double> copy_pass_(const at::Tensor& in, at::Tensor& out, int64_t repeat) {
  const auto dtype = in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "copy_pass_: in must be float32 or bfloat16");
  TORCH_CHECK(in.is_cpu() && in.is_contiguous() && out.is_cpu() && out.is_contiguous() && out.scalar_type() == dtype &&
                  out.numel() == in.numel(),
              "copy_pass_: in and out must be contiguous CPU tensors of one dtype and size");
  TORCH_CHECK(repeat >= 1, "copy_pass_: repeat must be at least 1, got ", repeat);
  std::vector<double> seconds(static_cast<size_t>(repeat));
  for (double& sec : seconds) {
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, in.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      if (dtype == at::kFloat) {
        copy_range(end - begin, in.const_data_ptr<float>() + begin, out.data_ptr<float>() + begin);
      } else {
        copy_range(end - begin, reinterpret_cast<const uint16_t*>(in.const_data_ptr<at::BFloat16>()) + begin,
                   reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + begin);
      }
    });
    sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return seconds;
}

}  // namespace

TORCH_LIBRARY(fused_train_bench, m) {
  m.def(
      "streaming_pass_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] states, bool zero_grad, int repeat)"
      " -> float[]");
  m.def("copy_pass_(Tensor input, Tensor(a!) out, int repeat) -> float[]");
}

TORCH_LIBRARY_IMPL(fused_train_bench, CPU, m) {
  m.impl("streaming_pass_", &streaming_pass_);
  m.impl("copy_pass_", &copy_pass_);
}
