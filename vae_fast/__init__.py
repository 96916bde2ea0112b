"""vae_fast: fused, exact VAE loss operators for PyTorch (CPU and CUDA)."""

from vae_fast import nn, reference
from vae_fast._backend import backend, current_backend
from vae_fast._validate import set_default_validate_args
from vae_fast.iwae import iwae, iwae_sample
from vae_fast.loss import elbo
from vae_fast.ops import bernoulli_log_prob, gaussian_kl, gaussian_log_prob, reparameterize

__all__ = [
    "backend",
    "bernoulli_log_prob",
    "current_backend",
    "elbo",
    "gaussian_kl",
    "gaussian_log_prob",
    "iwae",
    "iwae_sample",
    "nn",
    "reference",
    "reparameterize",
    "set_default_validate_args",
]
__version__ = "0.1.0"
