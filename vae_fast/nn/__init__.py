"""VAE modules over the public vae_fast functions: ELBOLoss, VAE (MLP) and ConvVAE.

The modules hold configuration and parameters; the maths is in the functions
(`vae_fast.elbo`, `vae_fast.reparameterize`, the log-densities and
`importance_log_likelihood`). They call only the public functions, so
``with vae_fast.backend("reference"):`` runs the same model on plain torch.
"""

from vae_fast.nn.importance import importance_log_likelihood
from vae_fast.nn.loss import ELBOLoss
from vae_fast.nn.models import VAE, ConvVAE, VAEOutput

__all__ = [
    "ConvVAE",
    "ELBOLoss",
    "VAE",
    "VAEOutput",
    "importance_log_likelihood",
]
