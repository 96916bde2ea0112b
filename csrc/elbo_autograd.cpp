// vae_fast::elbo's autograd, registered for torch's Autograd key. It is in C++ because
// the loss is called once per training step on batches small enough that the fixed
// cost of a Python autograd.Function (a Python forward, setup_context and backward:
// bench/overhead.py) is larger than the fused kernel itself.
//
// Forward calls the kernel below autograd with compute_grad as given and saves the
// gradients of `loss` it computed. An ordinary backward of `loss` alone scales and
// hands them back. Every other backward (one that is itself recorded, create_graph=True,
// to any order; gradients of the returned log_likelihood or kl; reduction="none"; x
// needing a gradient) calls vae_fast::_elbo_backward, implemented in Python beside the
// op's wrapper (vae_fast/loss.py), which runs the single-term backward kernels or the
// reference's vector-Jacobian product. Under torch.func transforms and forward-mode AD
// the public vae_fast.elbo runs vae_fast.reference instead; a direct call of this op
// there raises (a C++ autograd Function has neither a batching rule nor a tangent).

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/FuncTorchTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string_view>

namespace vae_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const char* const kNoRule =
    "vae_fast: torch.ops.vae_fast.elbo has no forward-mode derivative or vmap rule of its own; "
    "call the public vae_fast.elbo (it runs vae_fast.reference under forward AD and torch.func "
    "transforms) or use `with vae_fast.backend('reference'):`";

bool has_tangent(const at::Tensor& t) {
  // (Level 0, as torch's own operators check: the level `fwAD.dual_level()` opens.)
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

// Whether t is a tensor whose value can be read: not traced (torch.compile's fake and
// functional tensors carry the Python key) and not batched (a backward under vmap).
bool holds_values(const at::Tensor& t) {
  constexpr auto kTraced = c10::DispatchKeySet({c10::DispatchKey::Python,
                                                c10::DispatchKey::Functionalize,
                                                c10::DispatchKey::FuncTorchBatched,
                                                c10::DispatchKey::Batched});
  return !t.key_set().has_any(kTraced);
}

// grad_output == 1 exactly, so that the saved gradients need no scaling. Reading a
// value is free on the CPU; elsewhere it would be a host sync, so it is never read
// there (vae_fast/_autograd.py's is_exactly_one, for the ops differentiated in Python).
bool is_exactly_one(const at::Tensor& t) {
  return t.device().is_cpu() && holds_values(t) && t.numel() == 1 && t.item<double>() == 1.0;
}

// A gradient computed in the forward pass (for grad_output = 1), times grad_output. When
// the graph is freed after this backward it is scaled in place and handed over as it is
// (no copy); when it is retained, as a new tensor the caller owns, so that clipping it in
// place cannot change what a later backward reads. Out of place also for a batched
// grad_output (a backward under vmap): the saved gradient is one, the result has one per
// batch entry.
at::Tensor hand_back(at::Tensor g, const at::Tensor& grad_output, bool one) {
  const bool keep_graph = torch::autograd::get_current_graph_task_keep_graph();
  if (one) return keep_graph ? g.clone() : g;
  const at::Tensor scale = grad_output.to(g.scalar_type());
  const bool in_place = !keep_graph && holds_values(grad_output);
  return in_place ? g.mul_(scale) : g.mul(scale);
}

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

struct ElboFunction : public torch::autograd::Function<ElboFunction> {
  // The saved tensors, in order.
  enum Saved { kX, kRecon, kMu, kLogvar, kObsLogvar, kBeta, kKL, kGradRecon, kGradMu,
               kGradLogvar, kGradObsLogvar };

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& recon,
                               const at::Tensor& mu, const at::Tensor& logvar,
                               const std::optional<at::Tensor>& obs_logvar,
                               c10::string_view likelihood, const at::Tensor& beta,
                               c10::string_view reduction, bool compute_grad, bool validate_x) {
    static const auto op =
        find_op("vae_fast::elbo")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const std::optional<at::Tensor>&, c10::string_view, const at::Tensor&,
                c10::string_view, bool, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, ll, kl, g_recon, g_obs, g_mu, g_logvar] = op.call(
        x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad, validate_x);
    ctx->mark_non_differentiable({g_recon, g_obs, g_mu, g_logvar});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, recon, mu, logvar, obs_logvar.value_or(at::Tensor()), beta, kl,
                            g_recon, g_mu, g_logvar, g_obs});
    ctx->saved_data["likelihood"] = std::string(likelihood);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["compute_grad"] = compute_grad;
    return {loss, ll, kl, g_recon, g_obs, g_mu, g_logvar};
  }

  // One gradient per forward argument (undefined: none, as for the non-tensor ones).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool has_obs = saved[kObsLogvar].defined();
    // needs_input_grad counts the tensor arguments that were given (obs_logvar may not).
    const std::array<bool, 6> needs = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
        ctx->needs_input_grad(3), has_obs && ctx->needs_input_grad(4),
        ctx->needs_input_grad(has_obs ? 5 : 4)};
    const std::string& reduction = ctx->saved_data["reduction"].toStringRef();
    const at::Tensor& grad_loss = grads[0];
    variable_list out(10);  // x, recon, mu, logvar, obs_logvar, likelihood, beta, ...
    const bool fused = ctx->saved_data["compute_grad"].toBool() && !grads[1].defined() &&
                       !grads[2].defined() && reduction != "none" && !needs[0];
    if (!fused || at::GradMode::is_enabled()) {
      const auto general = general_backward(ctx, saved, grads, needs);
      for (size_t i = 0; i < 5; ++i) out[i] = general[i];
      out[6] = general[5];
      return out;
    }
    // The usual case: d(loss)/d(inputs) was computed in the forward pass.
    if (!grad_loss.defined()) return out;
    const bool one = is_exactly_one(grad_loss);
    if (needs[1]) out[1] = hand_back(saved[kGradRecon], grad_loss, one);
    if (needs[2]) out[2] = hand_back(saved[kGradMu], grad_loss, one);
    if (needs[3]) out[3] = hand_back(saved[kGradLogvar], grad_loss, one);
    if (needs[4]) out[4] = hand_back(saved[kGradObsLogvar], grad_loss, one);
    if (needs[5]) out[6] = beta_gradient(saved[kKL], saved[kBeta], grad_loss, reduction);
    return out;
  }

  // d(loss)/d(beta) = the reduced KL (the returned kl and log_likelihood do not depend
  // on beta), in the accumulation dtype; as vae_fast/loss.py's for the other backwards.
  static at::Tensor beta_gradient(const at::Tensor& kl, const at::Tensor& beta,
                                  const at::Tensor& grad_loss, const std::string& reduction) {
    const auto opmath = at::toOpMathType(kl.scalar_type());
    at::Tensor g = kl.to(opmath).mul(grad_loss.to(opmath)).sum();
    // (Over no rows: 0, as the mean's backward gives; not nan.)
    if (reduction == "mean") g = g.div(std::max<int64_t>(kl.size(0), 1));
    return g.to(beta.device(), beta.scalar_type());
  }

  // vae_fast::_elbo_backward (Python): six gradients, None where none flows.
  static std::array<at::Tensor, 6> general_backward(AutogradContext* ctx,
                                                    const variable_list& saved,
                                                    const variable_list& grads,
                                                    const std::array<bool, 6>& needs) {
    static const auto op = find_op("vae_fast::_elbo_backward");
    auto optional = [](const at::Tensor& t) {
      return t.defined() ? c10::IValue(t) : c10::IValue();
    };
    c10::List<bool> mask;
    for (bool need : needs) mask.push_back(need);
    torch::jit::Stack stack{optional(grads[0]), optional(grads[1]), optional(grads[2]),
                            saved[kX], saved[kRecon], saved[kMu], saved[kLogvar],
                            optional(saved[kObsLogvar]), saved[kBeta], saved[kKL],
                            ctx->saved_data["likelihood"], ctx->saved_data["reduction"],
                            std::move(mask)};
    op.callBoxed(stack);
    std::array<at::Tensor, 6> result;
    const auto list = stack.at(0).toListRef();
    TORCH_INTERNAL_ASSERT(list.size() == 6, "vae_fast::_elbo_backward returned ", list.size(),
                          " gradients, not 6");
    for (size_t i = 0; i < 6; ++i) {
      if (!list[i].isNone()) result[i] = list[i].toTensor();
    }
    return result;
  }
};

using ElboOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ElboOutputs elbo_autograd(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                          const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar,
                          c10::string_view likelihood, const at::Tensor& beta,
                          c10::string_view reduction, bool compute_grad, bool validate_x) {
  const at::Tensor obs = obs_logvar.value_or(at::Tensor());
  // A tangent would be dropped: torch's C++ autograd Functions have no forward derivative.
  for (const at::Tensor* t : {&x, &recon, &mu, &logvar, &obs, &beta}) {
    TORCH_CHECK(!has_tangent(*t), kNoRule);
  }
  bool recording = false;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* t : {&x, &recon, &mu, &logvar, &obs, &beta}) {
      recording = recording || (t->defined() && t->requires_grad());
    }
  }
  if (recording) {
    // Under a torch.func transform, torch refuses C++ autograd Functions with an error
    // that names none of this.
    if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
      try {
        functorch->checkSupportsCppAutogradFunction();
      } catch (const c10::Error&) {
        TORCH_CHECK(false, kNoRule);
      }
    }
    auto out = ElboFunction::apply(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction,
                                   compute_grad, validate_x);
    return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
  }
  static const auto op =
      find_op("vae_fast::elbo")
          .typed<ElboOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const std::optional<at::Tensor>&,
                             c10::string_view, const at::Tensor&, c10::string_view, bool, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad,
                 validate_x);
}

}  // namespace
}  // namespace vae_fast

TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) { m.impl("elbo", &vae_fast::elbo_autograd); }
