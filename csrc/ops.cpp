// Every vae_fast operator schema, declared once. Each op's implementation is one
// device-neutral glue, csrc/<op>.cpp, registered with TORCH_LIBRARY_IMPL for CPU (and
// CUDA), which runs the kernel of its tensors' device from csrc/cpu/ or csrc/cuda/;
// fake (meta) kernels and autograd are registered from Python, beside each op's
// wrapper (vae_fast/ops.py, loss.py, iwae.py), but for elbo's autograd, which is in C++
// for its per-call cost (csrc/elbo_autograd.cpp).
//
// Backward passes that need their own kernel are private ops (`_<op>_backward`)
// with their own schema, so they get per-device kernels and opcheck coverage.
// Their `output_mask` says which gradients to compute; a gradient that is not
// asked for comes back as an empty tensor (numel 0), never as garbage.

#include <torch/library.h>

TORCH_LIBRARY(vae_fast, m) {
  // sum over the last `event_dims` dims of x*logits - softplus(logits). validate_x:
  // raise if an element of x lies outside [0, 1] (found in the same pass over x).
  m.def(
      "bernoulli_log_prob(Tensor x, Tensor logits, int event_dims, bool validate_x=True) -> "
      "Tensor");
  m.def(
      "_bernoulli_log_prob_backward(Tensor grad, Tensor x, Tensor logits, int event_dims, "
      "bool[2] output_mask) -> (Tensor grad_x, Tensor grad_logits)");

  // sum of -0.5*(log(2pi) + logvar + (x-mean)^2 exp(-logvar)); logvar broadcasts to x
  m.def("gaussian_log_prob(Tensor x, Tensor mean, Tensor logvar, int event_dims) -> Tensor");
  m.def(
      "_gaussian_log_prob_backward(Tensor grad, Tensor x, Tensor mean, Tensor logvar, "
      "int event_dims, bool[3] output_mask) -> (Tensor grad_x, Tensor grad_mean, "
      "Tensor grad_logvar)");

  // KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)); None priors mean N(0, 1)
  m.def(
      "gaussian_kl(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, "
      "int event_dims) -> Tensor");
  m.def(
      "_gaussian_kl_backward(Tensor grad, Tensor mu, Tensor logvar, Tensor? prior_mu, "
      "Tensor? prior_logvar, int event_dims, bool[4] output_mask) -> (Tensor grad_mu, "
      "Tensor grad_logvar, Tensor grad_prior_mu, Tensor grad_prior_logvar)");

  // z = mu + exp(logvar/2) * eps. eps is returned (in the accumulation dtype) so
  // that backward uses it exactly instead of recovering it as (z - mu) / sigma.
  m.def(
      "reparameterize(Tensor mu, Tensor logvar, int? num_samples=None, *, "
      "Generator? generator=None) -> (Tensor z, Tensor eps)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "_reparameterize_backward(Tensor grad_z, Tensor logvar, Tensor eps, bool[2] output_mask) "
      "-> (Tensor grad_mu, Tensor grad_logvar)");

  // The fused loss. One pass over (x, recon) and one over (mu, logvar) give the
  // per-sample log-likelihood and KL and, when compute_grad, the gradient of
  // `loss` w.r.t. recon, obs_logvar, mu and logvar (for grad_output = 1), so that
  // backward only has to scale them. Gradients not computed are empty tensors.
  // beta is a 0-d tensor (on the CPU, or on x's device), not a float: a value that
  // changes every step (a KL warm-up) does not make torch.compile recompile.
  m.def(
      "elbo(Tensor x, Tensor recon, Tensor mu, Tensor logvar, Tensor? obs_logvar, "
      "str likelihood, Tensor beta, str reduction, bool compute_grad, bool validate_x=True) -> "
      "(Tensor loss, "
      "Tensor log_likelihood, Tensor kl, Tensor grad_recon, Tensor grad_obs_logvar, "
      "Tensor grad_mu, Tensor grad_logvar)");
  // elbo's backward wherever it is not the scaling of the gradients its forward pass
  // computed (csrc/elbo_autograd.cpp): a recorded backward (the reference's
  // vector-Jacobian product, to any order), gradients of log_likelihood or kl,
  // reduction="none", x needing a gradient. Implemented in Python (vae_fast/loss.py);
  // gradients of (x, recon, mu, logvar, obs_logvar, beta), None where none is asked for
  // or none flows.
  m.def(
      "_elbo_backward(Tensor? grad_loss, Tensor? grad_log_likelihood, Tensor? grad_kl, "
      "Tensor x, Tensor recon, Tensor mu, Tensor logvar, Tensor? obs_logvar, Tensor beta, "
      "Tensor kl, str likelihood, str reduction, bool[6] output_mask) -> Tensor?[]");
  // elbo(..., inplace_grad=True): the same pass, with d(loss)/d(recon) written over
  // recon itself, so that no full-size gradient is allocated (Liger-Kernel's
  // cross-entropy does the same with its logits).
  m.def(
      "_elbo_into_recon(Tensor x, Tensor(a!) recon, Tensor mu, Tensor logvar, "
      "Tensor? obs_logvar, str likelihood, Tensor beta, str reduction, bool validate_x=True) -> "
      "(Tensor loss, "
      "Tensor log_likelihood, Tensor kl, Tensor grad_obs_logvar, Tensor grad_mu, "
      "Tensor grad_logvar)");

  // The importance-weighted bound (Burda et al. 2016) of K samples: recon (K, B, ...)
  // and z (K, B, ...) against x (B, ...), mu, logvar (B, ...), which are broadcast
  // over the samples (never repeated). loss = -(logsumexp_k log w - log K), reduced
  // over the batch; log_weights (K, B) in the accumulation dtype. When compute_grad,
  // d(loss)/d(recon, z[, mu, logvar][, obs_logvar]) for grad_output = 1 come back
  // (computed with the normalized weights in the same pass): mu and logvar's score
  // terms only for estimator "iwae" ("stl" and "dreg" drop them; DReG's reweighting
  // of the path through z is applied by vae_fast.iwae_sample's backward). Gradients
  // not computed are empty tensors. obs_logvar broadcasts to recon.
  m.def(
      "iwae(Tensor x, Tensor recon, Tensor z, Tensor mu, Tensor logvar, Tensor? obs_logvar, "
      "str likelihood, str estimator, str reduction, bool compute_grad, bool validate_x=True) "
      "-> (Tensor loss, Tensor log_weights, Tensor grad_recon, Tensor grad_z, Tensor grad_mu, "
      "Tensor grad_logvar, Tensor grad_obs_logvar)");
}
