"""The checks of the private backward ops' fake kernels (torch.ops.vae_fast._*_backward):
what the C++ glue checks, so that meta tensors and compiled graphs refuse what a real
call refuses, with the same messages."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vae_fast._validate import check_same_shape, check_tensors, opmath_dtype


def check_output_mask(fn: str, output_mask: Sequence[bool], count: int) -> None:
    """A backward op's `output_mask`: one bool per gradient it can compute."""
    if len(output_mask) != count or not all(isinstance(m, bool) for m in output_mask):
        raise ValueError(f"{fn}: `output_mask` must be {count} bools, got {list(output_mask)!r}")


def check_row_grad(
    fn: str, grad: torch.Tensor, like_name: str, like: torch.Tensor, event_dims: int
) -> None:
    """The incoming gradient of a row-summing op's backward: one value per row."""
    check_tensors(fn, **{like_name: like, "grad": grad})
    batch = tuple(like.shape[: like.dim() - event_dims])
    if tuple(grad.shape) != batch:
        raise ValueError(
            f"{fn}: `grad` has shape {tuple(grad.shape)}; expected the batch shape {batch}"
        )


def check_reparameterize_backward(
    grad_z: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, output_mask: Sequence[bool]
) -> None:
    fn = "vae_fast.reparameterize"
    check_tensors(fn, logvar=logvar, grad_z=grad_z)
    check_same_shape(fn, "eps", eps, "grad_z", grad_z)
    if eps.device != logvar.device:
        raise ValueError(
            f"{fn}: `eps` is on {eps.device} but `logvar` is on {logvar.device}; all inputs "
            "of one call must be on the same device"
        )
    opmath = opmath_dtype(logvar.dtype)
    if eps.dtype != opmath:
        raise TypeError(
            f"{fn}: `eps` has dtype {eps.dtype}; expected {opmath}, the accumulation dtype "
            f"of `logvar`'s {logvar.dtype}"
        )
    if eps.shape != logvar.shape and eps.shape[1:] != logvar.shape:
        raise ValueError(
            f"{fn}: `eps` has shape {tuple(eps.shape)}; expected logvar's shape "
            f"{tuple(logvar.shape)} or (samples, *{tuple(logvar.shape)})"
        )
    check_output_mask(fn, output_mask, 2)
