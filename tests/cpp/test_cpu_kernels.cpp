// Tests of the CPU optimizer kernels, through libtorch:
//   test_cpu_kernels --isa default|avx2|avx512   one instruction set's kernel table, called directly
//   test_cpu_kernels --ops [--expect-isa NAME]     the registered ops, called through the dispatcher as a C++ user
//                                                  would (the ISA is the process's choice, FUSED_TRAIN_CPU_CAPABILITY)
// Both compare, bit for bit, with a scalar loop over optim_math.h on odd sizes (1, 15, 16, 17, 278011: below, at
// and around one vector, and many tiles, chunks and threads), in fp32, fp64, bf16 and fp16, over three steps, with
// and without in-kernel grad zeroing and GradScaler unscaling.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cpu/cpu_kernels.h"
#include "fused_train/optim_math.h"

namespace {

using fused_train::cpu::ChunkRange;
using fused_train::cpu::KernelTable;
using fused_train::cpu::OptimizerKind;
using fused_train::cpu::OptimizerLaunch;
using fused_train::cpu::ParamSlot;
using fused_train::cpu::ScalarKind;
namespace math = fused_train::math;

constexpr int64_t kSizes[] = {1, 15, 16, 17, 278011};
constexpr int kSteps = 3;

// ---------------------------------------------------------------------------------------------------------------
// Optimizer configurations: every flag of every optimizer is on in at least one of them.
struct OptimConfig {
  const char* name;
  OptimizerKind kind;
  double lr = 0.01, momentum = 0, dampening = 0, weight_decay = 0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // RMSprop: alpha in beta2
  bool nesterov = false, maximize = false, decoupled_weight_decay = false, amsgrad = false, centered = false;

  // Which of the three state buffers the kernel reads (see cpu_kernels.h's ParamSlot).
  bool uses_state(int k) const {
    switch (kind) {
      case OptimizerKind::Sgd: return k == 0 && momentum != 0;
      case OptimizerKind::Adam: return k < 2 || amsgrad;
      case OptimizerKind::Rmsprop: return k == 0 || (k == 1 && centered) || (k == 2 && momentum > 0);
    }
    return false;
  }
  // Range of the random initial state k: second moments positive, and RMSprop's square_avg above grad_avg².
  std::pair<double, double> state_range(int k) const {
    if (kind == OptimizerKind::Adam) return k == 0 ? std::pair{-0.1, 0.1} : std::pair{0.0, 0.01 * k};
    if (kind == OptimizerKind::Rmsprop && k == 0) return {0.01, 0.02};
    return {-0.1, 0.1};
  }
};

std::vector<OptimConfig> configs() {
  using K = OptimizerKind;
  std::vector<OptimConfig> c;
  c.push_back({.name = "sgd", .kind = K::Sgd, .lr = 0.1});
  c.push_back({.name = "sgd_momentum_dampening_decay_maximize", .kind = K::Sgd, .lr = 0.05, .momentum = 0.9,
               .dampening = 0.1, .weight_decay = 0.01, .maximize = true});
  c.push_back({.name = "sgd_nesterov", .kind = K::Sgd, .momentum = 0.9, .weight_decay = 1e-3, .nesterov = true});
  c.push_back({.name = "adam", .kind = K::Adam, .lr = 1e-3});
  c.push_back({.name = "adam_l2_amsgrad_maximize", .kind = K::Adam, .lr = 1e-3, .weight_decay = 0.01,
               .maximize = true, .amsgrad = true});
  // β1 = 0.3 takes torch.lerp's large-weight formula for exp_avg.
  c.push_back({.name = "adamw_small_beta1", .kind = K::Adam, .lr = 1e-3, .weight_decay = 0.01, .beta1 = 0.3,
               .beta2 = 0.99, .decoupled_weight_decay = true});
  c.push_back({.name = "rmsprop", .kind = K::Rmsprop, .beta2 = 0.99});
  c.push_back({.name = "rmsprop_centered_momentum_decay_small_alpha", .kind = K::Rmsprop, .momentum = 0.9,
               .weight_decay = 0.01, .beta2 = 0.3, .centered = true});
  return c;
}

// In-kernel work besides the update: zeroing the consumed grad, GradScaler's unscale (grads written back unscaled
// unless zeroed).
struct GradMode {
  bool zero_grad;
  std::optional<double> grad_scale;
};
constexpr GradMode kGradModes[] = {{false, std::nullopt}, {true, std::nullopt}, {false, 1024.0}, {true, 3.0}};

// ---------------------------------------------------------------------------------------------------------------
// One parameter with its grad and state, as plain arrays. T: storage type; O: opmath (float, or double for fp64).
template <class T, class O>
struct ParamData {
  std::vector<T> param, grad;
  std::array<std::vector<O>, 3> state;
};

// Deterministic uniform numbers (a 64-bit LCG), so a failure reproduces.
struct Random {
  uint64_t s;
  double uniform(double lo, double hi) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return lo + (hi - lo) * static_cast<double>(s >> 11) * (1.0 / 9007199254740992.0);
  }
};

template <class T, class O>
std::vector<ParamData<T, O>> make_params(const OptimConfig& c, Random& rng) {
  std::vector<ParamData<T, O>> out;
  for (int64_t n : kSizes) {
    ParamData<T, O> d;
    for (int64_t i = 0; i < n; ++i) d.param.push_back(static_cast<T>(rng.uniform(-1, 1)));
    d.grad.assign(n, T(0));
    for (int k = 0; k < 3; ++k) {
      if (!c.uses_state(k)) continue;
      const auto [lo, hi] = c.state_range(k);
      for (int64_t i = 0; i < n; ++i) d.state[k].push_back(static_cast<O>(rng.uniform(lo, hi)));
    }
    out.push_back(std::move(d));
  }
  return out;
}

template <class T, class O>
void fill_grads(std::vector<ParamData<T, O>>& ps, Random& rng) {
  for (auto& p : ps) {
    for (auto& g : p.grad) g = static_cast<T>(rng.uniform(-1, 1));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The reference: one scalar optim_math.h update per element, hyperparameters derived here from the config (not
// by the kernels' own code), widened to opmath and rounded once on store.
template <class O>
math::AdamHyper<O> adam_hyper(const OptimConfig& c) {
  return {O(c.beta1), O(1 - c.beta1), O(c.beta2), O(1 - c.beta2), O(c.weight_decay), O(1 - c.lr * c.weight_decay),
          O(c.eps), c.weight_decay != 0, c.decoupled_weight_decay, c.amsgrad, c.maximize, (1 - c.beta1) < 0.5};
}

template <class T, class O>
void reference_step(const OptimConfig& c, const GradMode& mode, int step, ParamData<T, O>& d) {
  const int64_t n = static_cast<int64_t>(d.param.size());
  const math::SgdHyper<O> sgd{O(c.lr), O(c.momentum), O(1 - c.dampening), O(c.weight_decay), c.weight_decay != 0,
                              c.momentum != 0, c.nesterov, c.maximize, step == 1};
  const math::AdamHyper<O> adam = adam_hyper<O>(c);
  const auto bc = math::adam_bias_correction(c.lr, c.beta1, c.beta2, step);
  const double alpha = c.beta2;
  const math::RmspropHyper<O> rms{O(c.lr), O(alpha), O(1 - alpha), O(c.eps), O(c.weight_decay), O(c.momentum),
                                  c.weight_decay != 0, c.centered, c.momentum > 0, c.maximize, (1 - alpha) < 0.5};
  O* s0 = d.state[0].empty() ? nullptr : d.state[0].data();
  O* s1 = d.state[1].empty() ? nullptr : d.state[1].data();
  O* s2 = d.state[2].empty() ? nullptr : d.state[2].data();
  for (int64_t i = 0; i < n; ++i) {
    O p = static_cast<O>(d.param[i]);
    O g = static_cast<O>(d.grad[i]);
    if (mode.grad_scale) g = g / static_cast<O>(*mode.grad_scale);
    switch (c.kind) {
      case OptimizerKind::Sgd:
        math::sgd_update<O>(p, g, s0 ? s0 + i : nullptr, sgd);
        break;
      case OptimizerKind::Adam:
        math::adam_update<O>(p, g, s0[i], s1[i], s2 ? s2 + i : nullptr, O(bc.neg_step_size), O(bc.bc2_sqrt), adam);
        break;
      case OptimizerKind::Rmsprop: {
        O gavg = s1 ? s1[i] : O(0), buf = s2 ? s2[i] : O(0);
        math::rmsprop_update<O>(p, g, s0[i], &gavg, &buf, rms);
        if (s1) s1[i] = gavg;
        if (s2) s2[i] = buf;
        break;
      }
    }
    d.param[i] = static_cast<T>(p);
    if (mode.zero_grad) {
      d.grad[i] = T(0);
    } else if (mode.grad_scale) {
      d.grad[i] = static_cast<T>(g);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Comparison: bit for bit. CMakeLists.txt compiles the kernels and this file with -ffp-contract=off, so every
// instruction set rounds each operation of optim_math.h exactly where this scalar loop does (vector sqrt and
// division are correctly rounded like the scalar ones). Without that flag the AVX2/AVX512 builds contract a·b + c
// into FMAs and differ in the last bits, unboundedly so where centered RMSprop's sq - ḡ² cancels.
template <class X>
bool same_bits(X a, X b) {
  return std::memcmp(&a, &b, sizeof(X)) == 0;
}

template <class X>
void check_array(const std::vector<X>& actual, const std::vector<X>& expected, const std::string& what) {
  FT_CHECK_MSG(actual.size() == expected.size(), what, ": sizes ", actual.size(), " vs ", expected.size());
  if (actual.size() != expected.size()) return;
  int64_t bad = 0, first_bad = -1;
  for (size_t i = 0; i < actual.size(); ++i) {
    if (!same_bits(actual[i], expected[i]) && bad++ == 0) first_bad = static_cast<int64_t>(i);
  }
  FT_CHECK_MSG(bad == 0, what, ": ", bad, " of ", actual.size(), " elements differ",
               bad ? ::ft_test::concat("; first at [", first_bad, "]: ", static_cast<double>(actual[first_bad]),
                                       " vs expected ", static_cast<double>(expected[first_bad]))
                   : std::string());
}

template <class T, class O>
void check_params(const std::vector<ParamData<T, O>>& actual, const std::vector<ParamData<T, O>>& expected,
                  const std::string& where) {
  for (size_t j = 0; j < actual.size(); ++j) {
    const std::string at = ::ft_test::concat(where, " numel ", actual[j].param.size());
    check_array(actual[j].param, expected[j].param, at + " param");
    check_array(actual[j].grad, expected[j].grad, at + " grad");
    for (int k = 0; k < 3; ++k) {
      check_array(actual[j].state[k], expected[j].state[k], at + " state" + std::to_string(k));
    }
  }
}

template <class T>
constexpr ScalarKind scalar_kind() {
  if constexpr (std::is_same_v<T, float>) return ScalarKind::Float;
  if constexpr (std::is_same_v<T, double>) return ScalarKind::Double;
  if constexpr (std::is_same_v<T, c10::BFloat16>) return ScalarKind::BFloat16;
  return ScalarKind::Half;
}

// ---------------------------------------------------------------------------------------------------------------
// Part 1: one ISA's kernel table, called directly with a hand-built launch.
const KernelTable* g_table = nullptr;

template <class T, class O>
void run_table_step(const OptimConfig& c, const GradMode& mode, int step, std::vector<ParamData<T, O>>& ps) {
  OptimizerLaunch l{};
  l.kind = c.kind;
  l.dtype = scalar_kind<T>();
  l.lr = c.lr;
  l.momentum = c.momentum;
  l.dampening = c.dampening;
  l.weight_decay = c.weight_decay;
  l.beta1 = c.beta1;
  l.beta2 = c.beta2;
  l.eps = c.eps;
  l.nesterov = c.nesterov;
  l.maximize = c.maximize;
  l.first_step = step == 1;
  l.decoupled_weight_decay = c.decoupled_weight_decay;
  l.amsgrad = c.amsgrad;
  l.centered = c.centered;
  l.zero_grad = mode.zero_grad;
  l.has_grad_scale = mode.grad_scale.has_value();
  l.grad_scale = mode.grad_scale.value_or(1.0);

  std::vector<ParamSlot> slots;
  std::vector<ChunkRange> chunks;
  // Chunks of an odd length, so that chunk boundaries fall inside vectors and tiles.
  constexpr int64_t kChunk = 10007;
  const auto bc = math::adam_bias_correction(c.lr, c.beta1, c.beta2, step);
  for (auto& d : ps) {
    ParamSlot s{};
    s.param = d.param.data();
    s.grad = d.grad.data();
    for (int k = 0; k < 3; ++k) s.state[k] = d.state[k].empty() ? nullptr : d.state[k].data();
    s.numel = static_cast<int64_t>(d.param.size());
    s.neg_step_size = bc.neg_step_size;
    s.bc2_sqrt = bc.bc2_sqrt;
    const int64_t slot = static_cast<int64_t>(slots.size());
    for (int64_t b = 0; b < s.numel; b += kChunk) chunks.push_back({slot, b, std::min(b + kChunk, s.numel)});
    slots.push_back(s);
  }
  l.slots = slots.data();
  l.chunks = chunks.data();
  // Two calls over disjoint chunk ranges, as two threads would make them.
  const int64_t n = static_cast<int64_t>(chunks.size()), half = n / 2;
  g_table->optimizer_chunks(l, 0, half);
  g_table->optimizer_chunks(l, half, n);
}

template <class T, class O>
void check_table_dtype(const char* dtype_name) {
  for (const OptimConfig& c : configs()) {
    for (const GradMode& mode : kGradModes) {
      Random rng{0x5eed};
      std::vector<ParamData<T, O>> kernel = make_params<T, O>(c, rng);
      std::vector<ParamData<T, O>> reference = kernel;
      for (int step = 1; step <= kSteps; ++step) {
        fill_grads(kernel, rng);
        for (size_t j = 0; j < kernel.size(); ++j) reference[j].grad = kernel[j].grad;
        run_table_step(c, mode, step, kernel);
        for (auto& d : reference) reference_step(c, mode, step, d);
        check_params(kernel, reference,
                     ::ft_test::concat(g_table->isa, " ", dtype_name, " ", c.name, " zero_grad=", mode.zero_grad,
                                       " grad_scale=", mode.grad_scale.value_or(0), " step ", step));
      }
    }
  }
}

FT_TEST(table_float32) { check_table_dtype<float, float>("float32"); }
FT_TEST(table_float64) { check_table_dtype<double, double>("float64"); }
FT_TEST(table_bfloat16) { check_table_dtype<c10::BFloat16, float>("bfloat16"); }
FT_TEST(table_float16) { check_table_dtype<c10::Half, float>("float16"); }

// ---------------------------------------------------------------------------------------------------------------
// Part 2: the ops, through the dispatcher.
using OptTensor = std::optional<at::Tensor>;
using OptTensorList = std::optional<at::TensorList>;  // (rounding_seeds: none here)
using SgdOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, double, double, double,
                   bool, bool, bool, bool, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensorList&,
                   at::OptionalIntArrayRef);
using AdamOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    double, double, double, double, double, bool, bool, bool, bool, const OptTensor&,
                    const OptTensor&, const OptTensor&, const OptTensorList&, at::OptionalIntArrayRef);
using RmspropOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                       at::TensorList, double, double, double, double, double, bool, bool, bool, const OptTensor&,
                       const OptTensor&, const OptTensor&, const OptTensorList&, at::OptionalIntArrayRef);

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

// The tensors of one op call; params[j] may be a non-dense view (the op then works on a copy and writes back).
struct OpTensors {
  std::vector<at::Tensor> params, grads, steps;
  std::array<std::vector<at::Tensor>, 3> states;
};

template <class T>
at::ScalarType aten_type() {
  return c10::CppTypeToScalarType<T>::value;
}

template <class X>
at::Tensor tensor_from(const std::vector<X>& v) {
  return at::from_blob(const_cast<X*>(v.data()), {static_cast<int64_t>(v.size())}, aten_type<X>()).clone();
}

template <class X>
std::vector<X> values_of(const at::Tensor& t) {
  at::Tensor c = t.contiguous().view({-1});
  return std::vector<X>(c.data_ptr<X>(), c.data_ptr<X>() + c.numel());
}

// The largest param becomes a strided column view of a wider buffer when `strided` is set.
template <class T, class O>
OpTensors to_tensors(const std::vector<ParamData<T, O>>& ps, bool strided) {
  OpTensors t;
  for (const auto& d : ps) {
    at::Tensor p = tensor_from(d.param);
    const int64_t n = p.numel();
    if (strided && n == 278011) {
      at::Tensor wide = at::zeros({n, 2}, p.options());
      at::Tensor view = wide.select(1, 1);
      view.copy_(p);
      p = view;
    }
    t.params.push_back(p);
    t.grads.push_back(tensor_from(d.grad));
    for (int k = 0; k < 3; ++k) {
      if (!d.state[k].empty()) t.states[k].push_back(tensor_from(d.state[k]));
    }
    t.steps.push_back(at::zeros({}, at::kFloat));
  }
  return t;
}

template <class T, class O>
std::vector<ParamData<T, O>> from_tensors(const OpTensors& t) {
  std::vector<ParamData<T, O>> ps(t.params.size());
  for (size_t j = 0; j < ps.size(); ++j) {
    ps[j].param = values_of<T>(t.params[j]);
    ps[j].grad = values_of<T>(t.grads[j]);
    for (int k = 0; k < 3; ++k) {
      if (!t.states[k].empty()) ps[j].state[k] = values_of<O>(t.states[k][j]);
    }
  }
  return ps;
}

void call_op(const OptimConfig& c, const GradMode& mode, int step, OpTensors& t, const OptTensor& found_inf) {
  const OptTensor scale = mode.grad_scale ? OptTensor(at::full({}, *mode.grad_scale)) : std::nullopt;
  switch (c.kind) {
    case OptimizerKind::Sgd:
      find_op<SgdOp>("fused_train::sgd_step_")
          .call(t.params, t.grads, t.states[0], {}, c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov,
                c.maximize, step == 1, mode.zero_grad, std::nullopt, scale, found_inf, std::nullopt, std::nullopt);
      break;
    case OptimizerKind::Adam:
      find_op<AdamOp>("fused_train::adam_step_")
          .call(t.params, t.grads, t.states[0], t.states[1], t.states[2], t.steps, c.lr, c.beta1, c.beta2,
                c.weight_decay, c.eps, c.amsgrad, c.maximize, c.decoupled_weight_decay, mode.zero_grad,
                std::nullopt, scale, found_inf, std::nullopt, std::nullopt);
      break;
    case OptimizerKind::Rmsprop:
      find_op<RmspropOp>("fused_train::rmsprop_step_")
          .call(t.params, t.grads, t.states[0], t.states[1], t.states[2], t.steps, c.lr, c.beta2, c.eps,
                c.weight_decay, c.momentum, c.centered, c.maximize, mode.zero_grad, std::nullopt, scale, found_inf,
                std::nullopt, std::nullopt);
      break;
  }
}

std::string g_process_isa;  // the ISA the ops run with in this process

// The table tests above cover every grad mode; through the ops, one plain and one with zeroing and unscaling.
constexpr GradMode kOpGradModes[] = {{false, std::nullopt}, {true, 1024.0}};

template <class T, class O>
void check_ops_dtype(const char* dtype_name) {
  for (const OptimConfig& c : configs()) {
    for (const GradMode& mode : kOpGradModes) {
      Random rng{0xface};
      std::vector<ParamData<T, O>> reference = make_params<T, O>(c, rng);
      OpTensors t = to_tensors(reference, /*strided=*/true);
      for (int step = 1; step <= kSteps; ++step) {
        fill_grads(reference, rng);
        for (size_t j = 0; j < reference.size(); ++j) t.grads[j].copy_(tensor_from(reference[j].grad));
        call_op(c, mode, step, t, std::nullopt);
        for (auto& d : reference) reference_step(c, mode, step, d);
        const std::string where = ::ft_test::concat("ops ", g_process_isa, " ", dtype_name, " ", c.name,
                                                    " zero_grad=", mode.zero_grad, " step ", step);
        check_params(from_tensors<T, O>(t), reference, where);
        if (c.kind != OptimizerKind::Sgd) {
          for (const at::Tensor& s : t.steps) FT_CHECK_MSG(s.item<double>() == step, where, ": state_steps");
        }
      }
    }
  }
}

FT_TEST(ops_float32) { check_ops_dtype<float, float>("float32"); }
FT_TEST(ops_float64) { check_ops_dtype<double, double>("float64"); }
FT_TEST(ops_bfloat16) { check_ops_dtype<c10::BFloat16, float>("bfloat16"); }
FT_TEST(ops_float16) { check_ops_dtype<c10::Half, float>("float16"); }

// GradScaler found an inf: the step is skipped, params, state and step counters are not written; grads the
// step owns (zero_grad) are zeroed all the same, as the CUDA kernels do.
FT_TEST(ops_found_inf_skips_the_step) {
  for (const OptimConfig& c : configs()) {
    Random rng{7};
    std::vector<ParamData<float, float>> before = make_params<float, float>(c, rng);
    fill_grads(before, rng);
    OpTensors t = to_tensors(before, /*strided=*/false);
    call_op(c, {true, 1024.0}, 1, t, at::ones({}));
    for (auto& d : before) std::fill(d.grad.begin(), d.grad.end(), 0.0f);
    check_params(from_tensors<float, float>(t), before, ::ft_test::concat("found_inf ", c.name));
    for (const at::Tensor& s : t.steps) FT_CHECK_MSG(s.item<double>() == 0, c.name, ": state_steps advanced");
  }
}

// A bad call throws, names the argument, and leaves every tensor as it was.
FT_TEST(ops_reject_mismatched_grad_untouched) {
  const OptimConfig c = configs()[3];  // adam
  Random rng{11};
  std::vector<ParamData<float, float>> before = make_params<float, float>(c, rng);
  fill_grads(before, rng);
  OpTensors t = to_tensors(before, /*strided=*/false);
  t.grads[4] = t.grads[4].narrow(0, 0, 100);  // the 278011-element param gets a 100-element grad
  FT_CHECK_THROWS(call_op(c, {true, std::nullopt}, 1, t, std::nullopt), "grads[4] has shape [100]");
  t.grads[4] = tensor_from(before[4].grad);
  check_params(from_tensors<float, float>(t), before, "after the rejected call");
  for (const at::Tensor& s : t.steps) FT_CHECK(s.item<double>() == 0);
}

// The library reports the instruction set it runs with (FUSED_TRAIN_CPU_CAPABILITY lowers it).
std::string g_expected_isa;
FT_TEST(ops_build_info_names_the_isa) {
  const std::string info =
      c10::Dispatcher::singleton().findSchemaOrThrow("fused_train::build_info", "").typed<std::string()>().call();
  FT_CHECK_MSG(info.find("cpu_capability=" + g_process_isa + "\n") != std::string::npos, info);
  if (!g_expected_isa.empty()) FT_CHECK_MSG(g_process_isa == g_expected_isa, "running ", g_process_isa);
}

// ---------------------------------------------------------------------------------------------------------------
bool cpu_supports(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return isa == "default";
}

const KernelTable* table_for(const std::string& isa) {
  if (isa == "default") return &fused_train::cpu::DEFAULT::kernel_table();
#if FUSED_TRAIN_X86_ISAS
  if (isa == "avx2") return &fused_train::cpu::AVX2::kernel_table();
  if (isa == "avx512") return &fused_train::cpu::AVX512::kernel_table();
#endif
  return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string usage = "usage: test_cpu_kernels --isa default|avx2|avx512 | --ops [--expect-isa NAME]";
  if (argc >= 3 && std::string(argv[1]) == "--isa") {
    const std::string isa = argv[2];
    g_table = table_for(isa);
    if (g_table == nullptr) {
      std::printf("%s\nunknown instruction set %s\n", usage.c_str(), isa.c_str());
      return 2;
    }
    if (!cpu_supports(isa)) {
      std::printf("skipped: this CPU does not support %s\n", isa.c_str());
      return 77;
    }
    return ft_test::run_tests("table_");
  }
  if (argc >= 2 && std::string(argv[1]) == "--ops") {
    if (argc >= 4 && std::string(argv[2]) == "--expect-isa") g_expected_isa = argv[3];
    g_process_isa = fused_train::cpu::kernel_table().isa;
    // At least two threads, so that the ops' parallel path (chunks split over threads) runs even on one core.
    if (at::get_num_threads() < 2) at::set_num_threads(2);
    std::printf("ops run with the %s kernels on %d threads\n", g_process_isa.c_str(), at::get_num_threads());
    return ft_test::run_tests("ops_");
  }
  std::printf("%s\n", usage.c_str());
  return 2;
}
