// fused_train::cross_entropy_loss: the loss with its autograd node in C++, for any device.
//
// fused_train.nn.functional.cross_entropy calls it for the common case, (N, C) logits with class-index
// targets, outside torch.compile (which traces nn/functional.py's autograd.Function, the
// path every other case takes). The reason is cost, not math: the two paths run the same ops. At the
// tutorial's 64×10 a Python autograd.Function's node, and the Python of its forward and backward, cost more
// than the loss's kernels, and more than torch's own C++ nodes for log_softmax + nll_loss.
//
// Forward: cross_entropy_forward_backward writes the gradient for a loss gradient of 1 while each row is in
// cache; it is kept in the context (not saved: it is handed over, not read) and the backward applies the
// real loss gradient as the Python path does (nothing for loss.backward() on CPU, cross_entropy_grad_loss_is_one;
// else cross_entropy_apply_grad_loss_, the scale applied before the one rounding), then gives it away, so
// autograd makes it the leaf's .grad without a copy. A second backward through the same graph
// (retain_graph=True) recomputes it from the saved logits and row log-sum-exps (cross_entropy_backward).
// Differentiating the gradient again raises, as in nn/functional.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fused_train {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Outputs4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Typed handles of the ops this file calls, looked up once.
const auto& forward_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_train::cross_entropy_forward_backward", "")
          .typed<Outputs5(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                          double, double, bool)>();
  return op;
}

const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_train::cross_entropy_forward", "")
          .typed<Outputs4(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                          double, double, bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_train::cross_entropy_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double)>();
  return op;
}

const auto& grad_loss_is_one_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_train::cross_entropy_grad_loss_is_one", "")
                             .typed<bool(const at::Tensor&)>();
  return op;
}

const auto& apply_grad_loss_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_train::cross_entropy_apply_grad_loss_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                      double)>();
  return op;
}

// The node given to a gradient computed under create_graph=True: it comes out of a kernel, not of
// differentiable ops, so differentiating it again must raise rather than silently give zero.
struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad) { return grad.view_as(grad); }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "cross_entropy: double backward (differentiating the gradient of fused_train's cross-entropy "
                "again) is not supported; use torch.nn.functional.cross_entropy for that");
  }
};

// saved_data keys.
constexpr const char* kGrad = "grad";
constexpr const char* kOptions = "options";
constexpr const char* kWeightNeedsGrad = "weight_needs_grad";

struct CrossEntropyLoss : public torch::autograd::Function<CrossEntropyLoss> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                            double label_smoothing, double lse_square_scale, bool opmath_loss) {
    // Straight to the device's kernel: the ops below have no autograd of their own (this node is it), and
    // the dispatcher's autograd fallback would box every argument and result on the way.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, z_loss, lse, denominator, grad] =
        forward_backward_op().call(input, target, weight, reduction, ignore_index, label_smoothing, lse_square_scale,
                                   opmath_loss);
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), lse, denominator});
    ctx->saved_data[kGrad] = std::move(grad);
    ctx->saved_data[kWeightNeedsGrad] = weight.has_value() && weight->requires_grad();
    ctx->saved_data[kOptions] =
        std::make_tuple(reduction, ignore_index, label_smoothing, lse_square_scale);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // As torch's nll_loss: no derivative for the class weights; asking for one raises rather than giving none.
    TORCH_CHECK(!ctx->saved_data[kWeightNeedsGrad].toBool(),
                "cross_entropy: the derivative for 'weight' is not implemented (pass a weight that does not "
                "require grad, e.g. weight.detach())");
    at::Tensor grad = gradient(ctx, grad_outputs[0]);
    // Under create_graph=True the gradient gets a node that raises if anything differentiates it again
    // (outside the below-autograd scope of gradient(), or the node would not be recorded).
    if (at::GradMode::is_enabled()) grad = NoDoubleBackward::apply(grad.detach().requires_grad_());
    // One entry per forward argument: only the logits get a gradient (none flows into targets or weights).
    return {grad, {}, {}, {}, {}, {}, {}, {}};
  }

 private:
  static at::Tensor gradient(AutogradContext* ctx, const at::Tensor& grad_loss) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor grad;
    c10::IValue& kept = ctx->saved_data[kGrad];
    // A batched grad_loss (autograd.grad(..., is_grads_batched=True), jacobian(vectorize=True)) wants one
    // gradient per batch entry: the functional backward, which has a vmap rule, not the kept single one.
    const bool batched = grad_loss.key_set().has_any(
        c10::DispatchKeySet({c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::Batched}));
    if (kept.isTensor()) {
      if (batched) {
        kept = c10::IValue();  // not used: one gradient per batch entry is recomputed below
      } else if (kept.toTensor().use_count() == 1) {
        // The context is the kept gradient's one owner in an eager backward. Compiled autograd instead runs
        // this backward on a context rebuilt from a copy of saved_data, every time (torch 2.11 and 2.14; 2.5
        // refuses C++ autograd functions there): letting go would not reach the node, and a
        // retain_graph backward would get the same tensor again, already scaled in place. So a gradient
        // something else also holds (compiled autograd; a dispatch mode that kept the forward's outputs)
        // is left where it is and recomputed from the logits.
        grad = std::move(kept).toTensor();
        kept = c10::IValue();  // the context lets go: autograd can keep the gradient as .grad without a copy
        if (grad_loss_is_one_op().call(grad_loss)) return grad;
      }
    }
    const auto options = ctx->saved_data[kOptions].toTuple();
    const auto& o = options->elements();
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> weight = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    if (grad.defined()) {
      apply_grad_loss_op().call(grad, grad_loss, saved[0], saved[1], weight, saved[3], saved[4], o[0].toInt(),
                                o[1].toInt(), o[2].toDouble(), o[3].toDouble());
    } else {  // a second backward (retain_graph=True), or a shared kept gradient: recomputed from the logits
      grad = backward_op().call(grad_loss, saved[0], saved[1], weight, saved[3], saved[4], o[0].toInt(), o[1].toInt(),
                                o[2].toDouble(), o[3].toDouble());
    }
    return grad;
  }
};

// Below autograd (inference mode, no gradient wanted): the forward alone.
at::Tensor cross_entropy_loss_forward_only(const at::Tensor& input, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight, int64_t reduction,
                                           int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                           bool opmath_loss) {
  return std::get<0>(forward_op().call(input, target, weight, reduction, ignore_index, label_smoothing,
                                       lse_square_scale, opmath_loss));
}

at::Tensor cross_entropy_loss_autograd(const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, int64_t reduction,
                                       int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                       bool opmath_loss) {
  if (at::GradMode::is_enabled() && input.requires_grad()) {
    return CrossEntropyLoss::apply(input, target, weight, reduction, ignore_index, label_smoothing, lse_square_scale,
                                   opmath_loss);
  }
  // No gradient to write (evaluation, torch.no_grad): one read of the logits, no node.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return cross_entropy_loss_forward_only(input, target, weight, reduction, ignore_index, label_smoothing,
                                         lse_square_scale, opmath_loss);
}

}  // namespace
}  // namespace fused_train

TORCH_LIBRARY_IMPL(fused_train, Autograd, m) {
  m.impl("cross_entropy_loss", &fused_train::cross_entropy_loss_autograd);
}

TORCH_LIBRARY_IMPL(fused_train, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_loss", &fused_train::cross_entropy_loss_forward_only);
}
