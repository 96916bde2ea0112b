"""Input checks shared by the fused ops, the reference and the fake kernels.

Every message names the function, the argument and what was expected, so that
bad input fails at the call site with a readable error instead of deep inside
a kernel (or, worse, as a silent broadcast).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import numpy as np
import torch

LIKELIHOODS = ("bernoulli", "gaussian")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)


_validate_args_default = True


def set_default_validate_args(value: bool) -> None:
    """Whether the Bernoulli ops check that their targets lie in [0, 1] when a call
    does not say (``validate_args=None``), as ``torch.distributions.Distribution.
    set_default_validate_args`` does for distributions. On by default. The check is
    made in the pass that reads x (no extra pass); on CUDA it reads one flag back,
    a host sync, so training loops that trust their data may turn it off."""
    global _validate_args_default
    if not isinstance(value, bool):
        raise TypeError(f"set_default_validate_args: expected a bool, got {value!r}")
    _validate_args_default = value


def check_flag(fn: str, name: str, value: bool) -> None:
    """A yes/no option must be a bool (a string such as "no" would read as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: `{name}` must be a bool, got {value!r}")


def resolve_validate_args(fn: str, value: bool | None) -> bool:
    if value is None:
        return _validate_args_default
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: `validate_args` must be a bool or None, got {value!r}")
    return value


def check_targets_in_unit_interval(fn: str, x: torch.Tensor) -> None:
    """The reference's check of Bernoulli targets (the fused ops make it in their pass
    over x). Skipped inside torch.func transforms, where a value cannot steer Python;
    under torch.compile on the CPU an assertion in the graph (a RuntimeError when it
    runs)."""
    if torch._C._are_functorch_transforms_active() or x.device.type == "meta" or x.numel() == 0:
        return
    outside = ((x < 0) | (x > 1)).any()
    advice = (
        "expected probabilities (scale 0..255 pixels to [0, 1]; the argument order is "
        "elbo(recon, x, mu, logvar)). validate_args=False skips this check"
    )
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        # (On CUDA the assertion is a device-side assert, which loses the message and
        # the context: there the branch below breaks the graph instead.)
        torch._assert_async(~outside, f"{fn}: `x` holds Bernoulli targets outside [0, 1]; {advice}")
        return
    if bool(outside):
        lo, hi = torch.aminmax(x.double())
        raise ValueError(
            f"{fn}: `x` holds Bernoulli targets outside [0, 1] (min {lo.item():g}, max "
            f"{hi.item():g}); {advice}"
        )


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute and accumulate in: float32 for half inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# The tensor arguments that may be None (their documented default).
OPTIONAL_TENSORS = frozenset({"obs_logvar", "prior_mu", "prior_logvar"})


def check_tensors(fn: str, **tensors: torch.Tensor | None) -> None:
    """Tensors must be floating, of one dtype and on one device; only the optional ones
    (OPTIONAL_TENSORS) may be None."""
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None and name in OPTIONAL_TENSORS:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(
                f"{fn}: `{name}` is a {t.layout} tensor; expected a dense (strided) one "
                f"(call .to_dense() first)"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{fn}: `{name}` has dtype {t.dtype}; expected a floating dtype "
                f"(float64, float32, bfloat16 or float16)"
            )
        if first is None:
            first_name, first = name, t
            continue
        if t.dtype != first.dtype:
            raise TypeError(
                f"{fn}: `{name}` has dtype {t.dtype} but `{first_name}` has {first.dtype}; "
                f"all float inputs of one call must share a dtype"
            )
        if t.device != first.device:
            raise ValueError(
                f"{fn}: `{name}` is on {t.device} but `{first_name}` is on {first.device}; "
                f"all inputs of one call must be on the same device"
            )


def check_same_shape(fn: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: `{name_b}` has shape {tuple(b.shape)} but `{name_a}` has shape "
            f"{tuple(a.shape)}; they must be equal"
        )


def check_broadcastable(fn: str, name: str, t: torch.Tensor, target: str, shape: Sequence[int]):
    """`t` must broadcast to `shape` without growing it (a scalar, per-feature or same shape)."""
    ok = t.dim() <= len(shape) and all(
        s == 1 or s == n for s, n in zip(reversed(t.shape), reversed(shape))
    )
    if not ok:
        raise ValueError(
            f"{fn}: `{name}` has shape {tuple(t.shape)}, which does not broadcast to "
            f"`{target}`'s shape {tuple(shape)}; expected a scalar, trailing (per-feature) "
            f"dims of it, or the same shape"
        )


def resolve_event_dims(fn: str, x: torch.Tensor, event_dims: int | None) -> int:
    """None means every dim but the first (a batch of samples); k means the last k dims."""
    if event_dims is None:
        return max(x.dim() - 1, 0)
    given, event_dims = event_dims, _as_int(event_dims)
    if event_dims is None:
        raise TypeError(f"{fn}: `event_dims` must be an int or None, got {given!r}")
    if not 0 <= event_dims <= x.dim():
        raise ValueError(
            f"{fn}: `event_dims`={event_dims} is out of range for an input with "
            f"{x.dim()} dims; expected 0 <= event_dims <= {x.dim()}"
        )
    return event_dims


def check_option(fn: str, name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(
            f"{fn}: unknown {name} {value!r}; expected one of {', '.join(map(repr, valid))}"
        )


def _as_int(value: object) -> int | None:
    """An int or a numpy integer as an int; None for anything else (a bool or numpy
    bool, a float, a tensor: operator.index would take a 0-d one, True included)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    return None


def positive_int(fn: str, name: str, value: object, alternative: str = "") -> int:
    """`value` as an int >= 1: an int or a numpy integer, not a bool or a float.
    `alternative`: what else the caller accepts, for the message ("or None")."""
    n = _as_int(value)
    if n is None or n < 1:
        expected = f"a positive int {alternative}".strip()
        raise ValueError(f"{fn}: `{name}` must be {expected}, got {value!r}")
    return n


def check_num_samples(fn: str, num_samples: int | None) -> int | None:
    """None, or num_samples as an int >= 1 (an int or a numpy integer)."""
    return None if num_samples is None else positive_int(fn, "num_samples", num_samples, "or None")


def check_elbo(
    x: torch.Tensor,
    recon: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    likelihood: str,
    obs_logvar: torch.Tensor | None,
    reduction: str,
) -> None:
    fn = "vae_fast.elbo"
    check_option(fn, "likelihood", likelihood, LIKELIHOODS)
    check_option(fn, "reduction", reduction, REDUCTIONS)
    check_tensors(fn, x=x, recon=recon, mu=mu, logvar=logvar, obs_logvar=obs_logvar)
    # recon of x's shape, or (K, *x.shape): K samples of the decoder's output.
    if not (recon.shape == x.shape or (recon.dim() == x.dim() + 1 and recon.shape[1:] == x.shape)):
        check_same_shape(fn, "x", x, "recon", recon)
    if recon.dim() == x.dim() + 1 and recon.shape[0] < 1:
        raise ValueError(f"{fn}: `recon` has no samples (shape {tuple(recon.shape)}); K >= 1")
    check_same_shape(fn, "mu", mu, "logvar", logvar)
    check_same_batch(fn, x, mu)
    check_obs_logvar(fn, obs_logvar, likelihood, "x", x.shape)


def check_elbo_samples(x: torch.Tensor, recon: torch.Tensor, num_samples: int | None) -> None:
    """elbo's `num_samples` against recon's shape: (K, *x.shape) with K = num_samples, or
    x's shape without it (a leading K dim without num_samples is refused, not guessed)."""
    fn = "vae_fast.elbo"
    if num_samples is None:
        if recon.dim() == x.dim() + 1:
            raise ValueError(
                f"{fn}: `recon` has shape {tuple(recon.shape)}, one more dim than x "
                f"{tuple(x.shape)}; for K samples of the decoder's output pass num_samples=K"
            )
        return
    num_samples = positive_int(fn, "num_samples", num_samples)
    if recon.dim() != x.dim() + 1 or recon.shape[0] != num_samples:
        raise ValueError(
            f"{fn}: with num_samples={num_samples}, `recon` must have shape "
            f"({num_samples}, *x.shape) = {(num_samples, *x.shape)}; got {tuple(recon.shape)}"
        )


def check_same_batch(fn: str, x: torch.Tensor, mu: torch.Tensor) -> None:
    """x and mu both have a leading batch dim, of one size."""
    if x.dim() < 1 or mu.dim() < 1:
        raise ValueError(
            f"{fn}: `x` and `mu` need a leading batch dim, got shapes "
            f"{tuple(x.shape)} and {tuple(mu.shape)}"
        )
    if mu.shape[0] != x.shape[0]:
        raise ValueError(
            f"{fn}: `mu` has batch size {mu.shape[0]} (shape {tuple(mu.shape)}) but `x` has "
            f"{x.shape[0]} (shape {tuple(x.shape)}); the first dims must match"
        )


def check_obs_logvar(
    fn: str, obs_logvar: torch.Tensor | None, likelihood: str, target: str, shape: Sequence[int]
) -> None:
    """A Gaussian observation log-variance broadcastable to `target`'s shape."""
    if obs_logvar is None:
        return
    if likelihood != "gaussian":
        raise ValueError(f"{fn}: `obs_logvar` is only used with likelihood='gaussian'")
    check_broadcastable(fn, "obs_logvar", obs_logvar, target, shape)


def check_bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor, event_dims: int | None) -> int:
    """Checks the arguments; returns the resolved event_dims."""
    fn = "vae_fast.bernoulli_log_prob"
    check_tensors(fn, x=x, logits=logits)
    check_same_shape(fn, "x", x, "logits", logits)
    return resolve_event_dims(fn, x, event_dims)


def check_gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, event_dims: int | None
) -> int:
    """Checks the arguments; returns the resolved event_dims."""
    fn = "vae_fast.gaussian_log_prob"
    check_tensors(fn, x=x, mean=mean, logvar=logvar)
    check_same_shape(fn, "x", x, "mean", mean)
    check_broadcastable(fn, "logvar", logvar, "x", x.shape)
    return resolve_event_dims(fn, x, event_dims)


def check_gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    event_dims: int | None,
) -> int:
    """Checks the arguments; returns the resolved event_dims."""
    fn = "vae_fast.gaussian_kl"
    check_tensors(fn, mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    check_same_shape(fn, "mu", mu, "logvar", logvar)
    for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if prior is not None:
            check_broadcastable(fn, name, prior, "mu", mu.shape)
    return resolve_event_dims(fn, mu, event_dims)


def check_reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int | None,
    eps: torch.Tensor | None = None,
) -> int | None:
    """Checks the arguments; returns num_samples as an int (or None)."""
    fn = "vae_fast.reparameterize"
    check_tensors(fn, mu=mu, logvar=logvar)
    check_same_shape(fn, "mu", mu, "logvar", logvar)
    num_samples = check_num_samples(fn, num_samples)
    if eps is None:
        return num_samples
    if not isinstance(eps, torch.Tensor) or eps.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: `eps` must be a floating torch.Tensor, got {_describe(eps)}")
    shape = tuple(mu.shape) if num_samples is None else (num_samples, *mu.shape)
    if tuple(eps.shape) != shape:
        raise ValueError(
            f"{fn}: `eps` has shape {tuple(eps.shape)}; expected z's shape {shape} "
            f"(mu's shape{'' if num_samples is None else ', after num_samples'})"
        )
    if eps.device != mu.device:
        raise ValueError(f"{fn}: `eps` is on {eps.device} but `mu` is on {mu.device}")
    return num_samples


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


@functools.lru_cache(maxsize=16)
def _beta_tensor(value: float) -> torch.Tensor:
    # Cached: most calls pass the same few numbers, and making a tensor costs ~5 us.
    # (The ops only read it; it is never handed to the caller.)
    return torch.tensor(value, dtype=torch.float64)


def check_beta(beta: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The KL weight as a 0-d tensor: a Python number (float64 on CPU, exact), or a 0-d
    floating tensor as it is (so that it keeps its gradient and, changing every step,
    does not make torch.compile recompile)."""
    fn = "vae_fast.elbo"
    if isinstance(beta, torch.Tensor):
        if beta.dim() != 0 or not beta.is_floating_point():
            raise ValueError(
                f"{fn}: `beta` must be a number or a 0-d floating tensor, got {_describe(beta)}"
            )
        if beta.device.type != "cpu" and beta.device != x.device:
            raise ValueError(
                f"{fn}: `beta` is on {beta.device}; expected the CPU or x's device {x.device}"
            )
        return beta
    if isinstance(beta, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(
        beta, bool
    ):
        if torch.compiler.is_compiling():
            # A product, not torch.tensor(beta): dynamo keeps a Python float that
            # changes between calls symbolic here instead of specializing on it.
            return torch.ones((), dtype=torch.float64) * beta
        return _beta_tensor(float(beta))
    raise TypeError(
        f"{fn}: `beta` must be a number or a 0-d floating tensor, got {_describe(beta)}"
    )


# --------------------------------------------------------------------------- iwae

ESTIMATORS = ("iwae", "stl", "dreg")
IWAE_FN = "vae_fast.iwae"


def check_iwae(
    recon: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    likelihood: str,
    obs_logvar: torch.Tensor | None,
    estimator: str,
    reduction: str,
) -> None:
    """The checks of csrc/common/iwae_checks.h, with the same messages."""
    check_option(IWAE_FN, "likelihood", likelihood, LIKELIHOODS)
    check_option(IWAE_FN, "estimator", estimator, ESTIMATORS)
    check_option(IWAE_FN, "reduction", reduction, REDUCTIONS)
    check_tensors(IWAE_FN, x=x, recon=recon, z=z, mu=mu, logvar=logvar, obs_logvar=obs_logvar)
    check_same_batch(IWAE_FN, x, mu)
    if recon.dim() != x.dim() + 1 or recon.shape[1:] != x.shape:
        raise ValueError(
            f"{IWAE_FN}: `recon` has shape {tuple(recon.shape)}; expected (K, *x.shape) for x of "
            f"shape {tuple(x.shape)} (K samples of the decoder's output)"
        )
    check_same_shape(IWAE_FN, "mu", mu, "logvar", logvar)
    if z.dim() != mu.dim() + 1 or z.shape[1:] != mu.shape:
        raise ValueError(
            f"{IWAE_FN}: `z` has shape {tuple(z.shape)}; expected (K, *mu.shape) for mu of shape "
            f"{tuple(mu.shape)}"
        )
    if z.shape[0] != recon.shape[0]:
        raise ValueError(
            f"{IWAE_FN}: `z` has {z.shape[0]} samples but `recon` has {recon.shape[0]}; "
            "the first dims must match"
        )
    if recon.shape[0] < 1:
        raise ValueError(f"{IWAE_FN}: needs at least one sample (K >= 1)")
    check_obs_logvar(IWAE_FN, obs_logvar, likelihood, "recon", recon.shape)
