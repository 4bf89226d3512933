#include "optimizer_args.h"

#include <c10/util/Exception.h>

#include "fused_train/quant_math.h"

namespace fused_train {

at::ScalarType opmath_type(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

bool is_supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold exactly one element, got ", t.numel());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
                   t.scalar_type());
  TORCH_CHECK(t.device() == device || t.device().is_cpu(), op, ": ", name, " must be on ", device,
              " (or the CPU), got ", t.device());
}

}  // namespace

OptimizerTensors check_optimizer_call(const char* op, at::TensorList params, at::TensorList grads,
                                      std::array<StateList, 3> states, at::TensorList steps, bool needs_steps,
                                      const std::optional<at::Tensor>& lr_tensor,
                                      const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf, bool writes_grad,
                                      bool contiguous) {
  OptimizerTensors out;
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, op, ": got ", n, " params but ", grads.size(), " grads");
  for (const auto& s : states) {
    if (s.used) {
      TORCH_CHECK(static_cast<int64_t>(s.tensors.size()) == n, op, ": got ", n, " params but ", s.tensors.size(),
                  " ", s.name);
    }
  }
  if (needs_steps) {
    TORCH_CHECK(static_cast<int64_t>(steps.size()) == n, op, ": got ", n, " params but ", steps.size(),
                " state_steps");
  }
  if (n == 0) return out;

  out.dtype = params[0].scalar_type();
  out.device = params[0].device();
  TORCH_CHECK_TYPE(is_supported_param_dtype(out.dtype), op,
                   ": params must be float32, float64, bfloat16 or float16, got ", out.dtype,
                   at::isComplexType(out.dtype) ? " (step complex params through torch.view_as_real)" : "");
  const at::ScalarType state_dtype = opmath_type(out.dtype);

  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] must be a strided (dense) tensor");
    TORCH_CHECK(p.device() == out.device, op, ": params[", i, "] is on ", p.device(), " but params[0] is on ",
                out.device, "; one call takes the params of one device");
    TORCH_CHECK_TYPE(p.scalar_type() == out.dtype, op, ": params[", i, "] is ", p.scalar_type(),
                     " but params[0] is ", out.dtype, "; one call takes one dtype");
    TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined");
    TORCH_CHECK(g.layout() == at::kStrided, op, ": grads[", i,
                "] is sparse; fused_train optimizers take dense gradients only");
    TORCH_CHECK(g.device() == out.device, op, ": grads[", i, "] is on ", g.device(), " but its param is on ",
                out.device);
    TORCH_CHECK_TYPE(g.scalar_type() == out.dtype, op, ": grads[", i, "] is ", g.scalar_type(),
                     " but its param is ", out.dtype);
    TORCH_CHECK(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(), " but its param has shape ",
                p.sizes());
    for (const auto& s : states) {
      if (!s.used) continue;
      const at::Tensor& st = s.tensors[i];
      TORCH_CHECK(st.device() == out.device && st.sizes() == p.sizes() && st.scalar_type() == state_dtype, op,
                  ": ", s.name, "[", i, "] must be a ", state_dtype, " tensor of shape ", p.sizes(), " on ",
                  out.device, ", got ", st.scalar_type(), " ", st.sizes(), " on ", st.device());
    }
    if (needs_steps) check_scalar_tensor(op, "state_steps[i]", steps[i], out.device);
  }
  if (lr_tensor.has_value()) check_scalar_tensor(op, "lr", *lr_tensor, out.device);
  if (grad_scale.has_value()) check_scalar_tensor(op, "grad_scale", *grad_scale, out.device);
  if (found_inf.has_value()) check_scalar_tensor(op, "found_inf", *found_inf, out.device);

  // Layout: the kernels walk each param and its grad and state as one flat array, which needs them dense
  // and laid out alike. Anything else (a strided view, a grad with other strides) runs on contiguous copies.
  out.params.reserve(n);
  out.grads.reserve(n);
  for (auto& s : out.states) s.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor p = params[i];
    at::Tensor g = grads[i];
    bool alike = contiguous ? p.is_contiguous() && g.is_contiguous()
                            : p.is_non_overlapping_and_dense() && g.strides() == p.strides();
    for (const auto& s : states) {
      if (s.used) alike = alike && s.tensors[i].strides() == p.strides();
    }
    if (!alike && p.numel() > 0) {
      at::Tensor pc = p.contiguous(), gc = g.contiguous();
      out.copy_back.emplace_back(p, pc);
      if (writes_grad) out.copy_back.emplace_back(g, gc);
      p = pc;
      g = gc;
      for (size_t k = 0; k < states.size(); ++k) {
        if (!states[k].used) continue;
        at::Tensor sc = states[k].tensors[i].contiguous();
        out.copy_back.emplace_back(states[k].tensors[i], sc);
      }
    }
    out.params.push_back(p);
    out.grads.push_back(g);
    for (size_t k = 0; k < states.size(); ++k) {
      if (!states[k].used) {
        out.states[k].emplace_back();
      } else if (!alike && p.numel() > 0) {
        // the copy made above is the last entry recorded for this state
        for (auto it = out.copy_back.rbegin(); it != out.copy_back.rend(); ++it) {
          if (it->first.is_same(states[k].tensors[i])) {
            out.states[k].push_back(it->second);
            break;
          }
        }
      } else {
        out.states[k].push_back(states[k].tensors[i]);
      }
    }
    if (needs_steps) out.steps.push_back(steps[i]);
  }
  return out;
}

namespace {

// Stochastic rounding's seeds: none, or one per param, for bf16 params (other dtypes round to nearest; the caller
// leaves their seeds out, so a seed there is a mistake worth naming).
void check_rounding_seeds(const char* op, OptimizerTensors& out, const std::optional<at::TensorList>& seeds,
                          int64_t n, at::OptionalIntArrayRef offsets = std::nullopt) {
  const bool has_offsets = offsets.has_value() && !offsets->empty();
  TORCH_CHECK(!has_offsets || (seeds.has_value() && !seeds->empty()), op,
              ": rounding_offsets apply with rounding_seeds (stochastic rounding), got ", offsets->size(),
              " rounding_offsets and no rounding_seeds");
  if (!seeds.has_value() || seeds->empty()) return;
  TORCH_CHECK(static_cast<int64_t>(seeds->size()) == n, op, ": got ", n, " params but ", seeds->size(),
              " rounding_seeds");
  if (n == 0) return;
  TORCH_CHECK_TYPE(out.dtype == at::kBFloat16, op, ": rounding_seeds (stochastic rounding) apply to bfloat16 "
                   "params only, got ", out.dtype, " params");
  TORCH_CHECK(!out.steps.empty(), op, ": rounding_seeds need state_steps (the step is the rounding's counter)");
  out.rounding_seeds.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& s = (*seeds)[i];
    TORCH_CHECK(s.defined() && s.scalar_type() == at::kLong && s.numel() == 1 && s.device() == out.device, op,
                ": rounding_seeds[", i, "] must be a one-element int64 tensor on ", out.device, ", got ",
                s.defined() ? std::string(c10::toString(s.scalar_type())) + " of " + std::to_string(s.numel()) +
                                  " elements on " + s.device().str()
                            : std::string("an undefined tensor"));
    out.rounding_seeds.push_back(s);
  }
  if (has_offsets) {
    TORCH_CHECK(static_cast<int64_t>(offsets->size()) == n, op, ": got ", n, " params but ", offsets->size(),
                " rounding_offsets");
    for (const int64_t offset : *offsets) out.rounding_offsets.push_back(static_cast<uint64_t>(offset));
  }
}

}  // namespace

// Grads are written when the kernel zeroes them or writes them back unscaled.
OptimizerTensors check_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                double momentum, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf, at::TensorList state_steps,
                                const std::optional<at::TensorList>& rounding_seeds,
                                at::OptionalIntArrayRef rounding_offsets) {
  const bool has_steps = !state_steps.empty();
  OptimizerTensors out = check_optimizer_call(
      "sgd_step_", params, grads,
      {StateList{"momentum_buffers", momentum_buffers, momentum != 0.0}, StateList{"", {}, false},
       StateList{"", {}, false}},
      state_steps, has_steps, lr_tensor, grad_scale, found_inf, zero_grad || grad_scale.has_value());
  check_rounding_seeds("sgd_step_", out, rounding_seeds, static_cast<int64_t>(params.size()), rounding_offsets);
  return out;
}

OptimizerTensors check_adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                 at::TensorList state_steps, bool amsgrad, bool zero_grad,
                                 const std::optional<at::Tensor>& lr_tensor,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf,
                                 const std::optional<at::TensorList>& rounding_seeds,
                                 at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors out = check_optimizer_call(
      "adam_step_", params, grads,
      {StateList{"exp_avgs", exp_avgs, true}, StateList{"exp_avg_sqs", exp_avg_sqs, true},
       StateList{"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
      state_steps, true, lr_tensor, grad_scale, found_inf, zero_grad || grad_scale.has_value());
  check_rounding_seeds("adam_step_", out, rounding_seeds, static_cast<int64_t>(params.size()), rounding_offsets);
  return out;
}

OptimizerTensors check_rmsprop_step(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                                    at::TensorList grad_avgs, at::TensorList momentum_buffers,
                                    at::TensorList state_steps, bool centered, double momentum, bool zero_grad,
                                    const std::optional<at::Tensor>& lr_tensor,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf,
                                    const std::optional<at::TensorList>& rounding_seeds,
                                    at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors out = check_optimizer_call(
      "rmsprop_step_", params, grads,
      {StateList{"square_avgs", square_avgs, true}, StateList{"grad_avgs", grad_avgs, centered},
       StateList{"momentum_buffers", momentum_buffers, momentum > 0.0}},
      state_steps, true, lr_tensor, grad_scale, found_inf, zero_grad || grad_scale.has_value());
  check_rounding_seeds("rmsprop_step_", out, rounding_seeds, static_cast<int64_t>(params.size()), rounding_offsets);
  return out;
}

namespace {

// One quantized moment of an 8-bit op: its codes and absmax lists, and whether the call uses it (else both lists
// must be empty).
struct QuantizedList {
  const char* codes_name;
  at::TensorList codes;
  const char* absmax_name;
  at::TensorList absmax;
  bool used;
};

// The elements per row of the blocks an absmax of this shape stands for (math::QuantRows): 1-D, the param as one
// row (one value per kQuantBlock elements); 2-D (rows, k) for a param of 2+ dims, its dim 0's rows of numel / rows
// elements each, k = ceil(that / 256).
int64_t absmax_row_length(const char* op, const char* name, size_t i, const at::Tensor& absmax,
                          const at::Tensor& param) {
  const int64_t numel = param.numel();
  const int64_t flat_blocks = (numel + math::kQuantBlock - 1) / math::kQuantBlock;
  if (absmax.dim() == 1 && absmax.numel() == flat_blocks) {
    return numel > 0 ? numel : 1;
  }
  if (absmax.dim() == 2 && param.dim() >= 2 && absmax.size(0) == param.size(0)) {
    const int64_t rows = absmax.size(0);
    if (numel == 0) {
      if (absmax.numel() == 0) return 1;  // (an empty shard: no blocks)
    } else if (absmax.size(1) == math::QuantRows::of(numel / rows).blocks_per_row) {
      return numel / rows;
    }
  }
  TORCH_CHECK(false, op, ": ", name, "[", i, "] must have one fp32 value per block of 256 of its param's ", numel,
              " elements: 1-D of ", flat_blocks,
              " (the param as one row), or, for a param of 2 or more dims, 2-D (its dim 0, ceil(row elements / 256)); "
              "got shape ", absmax.sizes());
  return 0;
}

OptimizerTensors check_8bit_step(const char* op, at::TensorList params, at::TensorList grads,
                                 const std::vector<QuantizedList>& moments, at::TensorList state_steps,
                                 bool needs_steps, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf,
                                 const std::optional<at::TensorList>& rounding_seeds,
                                 at::OptionalIntArrayRef rounding_offsets) {
  for (const QuantizedList& q : moments) {
    for (const auto& [name, list] : {std::make_pair(q.codes_name, q.codes), std::make_pair(q.absmax_name, q.absmax)}) {
      if (q.used) {
        TORCH_CHECK(list.size() == params.size(), op, ": got ", params.size(), " params but ", list.size(), " ", name);
      } else {
        TORCH_CHECK(list.empty(), op, ": ", name, " must be empty when the call's options do not use it, got ",
                    list.size(), " tensors");
      }
    }
  }
  OptimizerTensors out = check_optimizer_call(op, params, grads,
                                              {StateList{"", {}, false}, StateList{"", {}, false},
                                               StateList{"", {}, false}},
                                              state_steps, needs_steps, lr_tensor, grad_scale, found_inf,
                                              zero_grad || grad_scale.has_value(), /*contiguous=*/true);
  if (params.empty()) return out;
  TORCH_CHECK_TYPE(out.dtype == at::kFloat || out.dtype == at::kBFloat16 || out.dtype == at::kHalf, op,
                   ": params must be float32, bfloat16 or float16, got ", out.dtype);
  for (auto& s : out.states) s.clear();  // the generic check filled them with undefined entries
  out.quant_rows.assign(params.size(), 0);
  int slot = 0;
  const QuantizedList* first_used = nullptr;  // the moment whose absmax set each param's rows first
  for (const QuantizedList& q : moments) {
    if (!q.used) continue;
    for (size_t i = 0; i < params.size(); ++i) {
      for (int part = 0; part < 2; ++part) {
        const bool is_codes = part == 0;
        const at::Tensor& s = is_codes ? q.codes[i] : q.absmax[i];
        const char* name = is_codes ? q.codes_name : q.absmax_name;
        const at::ScalarType want = is_codes ? at::kByte : at::kFloat;
        TORCH_CHECK(s.device() == out.device && s.scalar_type() == want && s.is_contiguous(), op, ": ", name, "[", i,
                    "] must be a contiguous ", want, " tensor on ", out.device, ", got ", s.scalar_type(),
                    s.is_contiguous() ? "" : " (not contiguous)", " on ", s.device());
        if (is_codes) {
          TORCH_CHECK(s.sizes() == params[i].sizes(), op, ": ", name, "[", i, "] must have its param's shape ",
                      params[i].sizes(), ", got ", s.sizes());
        } else {
          const int64_t row = absmax_row_length(op, name, i, s, params[i]);
          if (first_used == nullptr) {
            out.quant_rows[i] = row;
          } else {
            TORCH_CHECK(row == out.quant_rows[i], op, ": ", name, "[", i, "] ", s.sizes(),
                        " cuts the param into rows of ", row, " elements but ", first_used->absmax_name, "[", i, "] ",
                        first_used->absmax[i].sizes(), " into rows of ", out.quant_rows[i],
                        "; every moment of a param must have one layout");
          }
        }
        out.states[slot + part].push_back(s);
      }
    }
    if (first_used == nullptr) first_used = &q;
    slot += 2;
  }
  check_rounding_seeds(op, out, rounding_seeds, static_cast<int64_t>(params.size()), rounding_offsets);
  return out;
}

}  // namespace

OptimizerTensors check_adam8bit_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                                     at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                                     at::TensorList exp_avg_sq_absmax, at::TensorList state_steps, bool zero_grad,
                                     const std::optional<at::Tensor>& lr_tensor,
                                     const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf,
                                     const std::optional<at::TensorList>& rounding_seeds,
                                     at::OptionalIntArrayRef rounding_offsets) {
  return check_8bit_step("adam8bit_step_", params, grads,
                         {{"exp_avg_codes", exp_avg_codes, "exp_avg_absmax", exp_avg_absmax, true},
                          {"exp_avg_sq_codes", exp_avg_sq_codes, "exp_avg_sq_absmax", exp_avg_sq_absmax, true}},
                         state_steps, true, zero_grad, lr_tensor, grad_scale, found_inf, rounding_seeds,
                         rounding_offsets);
}

OptimizerTensors check_sgd8bit_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffer_codes,
                                    at::TensorList momentum_buffer_absmax, at::TensorList state_steps,
                                    double momentum, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf,
                                    const std::optional<at::TensorList>& rounding_seeds,
                                    at::OptionalIntArrayRef rounding_offsets) {
  TORCH_CHECK(momentum != 0.0, "sgd8bit_step_: momentum must be nonzero (without momentum SGD keeps no state: "
              "step with sgd_step_), got ", momentum);
  return check_8bit_step("sgd8bit_step_", params, grads,
                         {{"momentum_buffer_codes", momentum_buffer_codes, "momentum_buffer_absmax",
                           momentum_buffer_absmax, true}},
                         state_steps, !state_steps.empty(), zero_grad, lr_tensor, grad_scale, found_inf,
                         rounding_seeds, rounding_offsets);
}

OptimizerTensors check_rmsprop8bit_step(at::TensorList params, at::TensorList grads, at::TensorList square_avg_codes,
                                        at::TensorList square_avg_absmax, at::TensorList momentum_buffer_codes,
                                        at::TensorList momentum_buffer_absmax, at::TensorList state_steps,
                                        double momentum, bool zero_grad,
                                        const std::optional<at::Tensor>& lr_tensor,
                                        const std::optional<at::Tensor>& grad_scale,
                                        const std::optional<at::Tensor>& found_inf,
                                        const std::optional<at::TensorList>& rounding_seeds,
                                        at::OptionalIntArrayRef rounding_offsets) {
  return check_8bit_step(
      "rmsprop8bit_step_", params, grads,
      {{"square_avg_codes", square_avg_codes, "square_avg_absmax", square_avg_absmax, true},
       {"momentum_buffer_codes", momentum_buffer_codes, "momentum_buffer_absmax", momentum_buffer_absmax,
        momentum > 0.0}},
      state_steps, true, zero_grad, lr_tensor, grad_scale, found_inf, rounding_seeds, rounding_offsets);
}

void finish_optimizer_call(OptimizerTensors& t) {
  for (auto& [original, working] : t.copy_back) {
    if (!original.is_same(working)) original.copy_(working);
  }
}

}  // namespace fused_train
