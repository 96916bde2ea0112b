"""The checks of elbo(inplace_grad=True), which writes d(loss)/d(recon) over recon: the
layout it needs, and what autograd (and torch's own in-place rules) must still allow."""

from __future__ import annotations

import torch

_INPLACE_FN = "vae_fast.elbo(inplace_grad=True)"


def check_inplace_grad_layout(recon: torch.Tensor, reduction: str) -> None:
    """elbo(inplace_grad=True): the gradient can be written over recon, once per sample."""
    if reduction == "none":
        raise ValueError(
            f"{_INPLACE_FN}: needs reduction 'mean' or 'sum' (with 'none' the gradient "
            "depends on grad_output per sample, so it cannot be written in the forward pass)"
        )
    if not recon.is_contiguous():
        raise ValueError(
            f"{_INPLACE_FN}: writes the gradient over `recon`, which must be contiguous; "
            f"got shape {tuple(recon.shape)} with strides {recon.stride()}"
        )


def check_inplace_grad_autograd(x: torch.Tensor, recon: torch.Tensor) -> None:
    """elbo(inplace_grad=True): recon may be overwritten by its gradient."""
    fn = _INPLACE_FN
    if recon.is_leaf and recon.requires_grad:
        raise ValueError(
            f"{fn}: `recon` is a leaf tensor (a parameter or an input); its gradient "
            "cannot replace its values. Pass the decoder's output, or inplace_grad=False"
        )
    if x.requires_grad:
        raise ValueError(
            f"{fn}: `x` requires grad, and d(loss)/d(x) needs recon's values in backward; "
            "use inplace_grad=False"
        )
    saver = saved_by_producer(recon)
    if saver is not None:
        raise ValueError(
            f"{fn}: `recon` was saved by {saver} for its own backward, so it cannot be "
            "overwritten; produce it with an op that does not save its output (e.g. "
            "nn.Linear), or use inplace_grad=False"
        )


def saved_by_producer(t: torch.Tensor) -> str | None:
    """The name of t's grad_fn if that node saved t itself for backward (e.g. sigmoid).

    A saved tensor further up the graph (through views) is caught by autograd's own
    version check at backward time, because the kernel bumps recon's version.
    """
    node = t.grad_fn
    if node is None:
        return None
    storage = t.untyped_storage().data_ptr()
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            saved = getattr(node, name)
        except RuntimeError:  # freed after an earlier backward
            continue
        if isinstance(saved, torch.Tensor) and saved.untyped_storage().data_ptr() == storage:
            return node.name()
    return None


def check_overwritable(fn: str, name: str, t: torch.Tensor) -> None:
    """`t` can be written over in place, as torch's own in-place ops require."""
    if t.is_neg() or t.is_conj():
        raise ValueError(
            f"{fn}: `{name}` is a lazily negated or conjugated view, which cannot be written "
            "over; pass it materialized (.resolve_neg(), .resolve_conj())"
        )
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{fn}: `{name}` is an inference tensor (made under torch.inference_mode()), "
            "which cannot be written over outside inference mode"
        )
