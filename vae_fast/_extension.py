"""The compiled library and what every op wrapper shares: loading vae_fast._C, the
backend switch (`public`), the registration of an op's fake kernel and autograd, and
small helpers for the gradients an op hands back."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from vae_fast import _autograd
from vae_fast import _validate as V

try:  # loading the compiled library registers the operators with torch
    from vae_fast import _C  # noqa: F401

    LOAD_ERROR: ImportError | None = None
except ImportError as error:  # a source checkout that was never built
    LOAD_ERROR = error

ops = torch.ops.vae_fast
_LIB = torch.library.Library("vae_fast", "IMPL")  # kept alive: registrations die with it
_F = TypeVar("_F", bound=Callable[..., Any])


def require_extension() -> None:
    if LOAD_ERROR is not None:
        raise RuntimeError(
            f"vae_fast's compiled extension (vae_fast._C) is not available ({LOAD_ERROR}); "
            "build it with `make build` (or `pip install --no-build-isolation -e .`), "
            "or use `with vae_fast.backend('reference'):`"
        )


def _autocast(value: Any) -> Any:
    """Under autocast the losses run in float32, as torch's own losses do: half inputs
    become float32 (the usual mix is data in float32 and a decoder output in bfloat16,
    and the ops require one dtype); float64 stays float64."""
    if (
        isinstance(value, torch.Tensor)
        and value.dtype in V.HALF_DTYPES
        and torch.amp.is_autocast_available(value.device.type)
        and torch.is_autocast_enabled(value.device.type)
    ):
        return value.float()
    return value


def public(reference_fn: Callable[..., Any], *, autocast: bool = True) -> Callable[[_F], _F]:
    """The backend switch, once for every public function: the fused op, or
    `reference_fn` (same signature) where `_autograd.runs_reference` says so."""

    def decorate(fused: _F) -> _F:
        @functools.wraps(fused)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if autocast:
                args = tuple(_autocast(a) for a in args)
                kwargs = {k: _autocast(v) for k, v in kwargs.items()}
            if _autograd.runs_reference(*args, *kwargs.values()):
                return reference_fn(*args, **kwargs)
            require_extension()
            return fused(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def register_op(
    name: str,
    fake: Callable[..., Any],
    setup_context: Callable[..., Any] | None = None,
    backward: Callable[..., Any] | None = None,
    *,
    autocast: bool = False,
    overwritten: int | None = None,
    check_call: Callable[[tuple[Any, ...], bool], None] | None = None,
    vmap: Callable[..., Any] | None = None,
    autograd_in_cpp: bool = False,
) -> None:
    """Registers torch.ops.vae_fast.<name>'s fake kernel and its autograd: `setup_context`
    and `backward` as its one autograd route, none (`autograd_in_cpp`: registered by the
    compiled library), or (a private backward op, given neither) first-order only.
    `autocast`: direct torch.ops calls under autocast run half inputs in float32 (float64
    is kept). `overwritten` and `check_call`: see `_autograd.register`. `vmap`: its rule
    for torch.func.vmap (torch.library.register_vmap). Nothing to register when the
    library is not built."""
    if LOAD_ERROR is not None:
        return
    torch.library.register_fake(f"vae_fast::{name}", _one_device(name, fake))
    if autograd_in_cpp:
        pass
    elif backward is not None:
        _autograd.register(
            name, setup_context, backward, overwritten=overwritten, check_call=check_call
        )
    else:
        _autograd.register_first_order_only(name)
    if vmap is not None:
        torch.library.register_vmap(f"vae_fast::{name}", vmap)
    if autocast:
        for device in ("cpu", "cuda"):
            torch.library.register_autocast(f"vae_fast::{name}", device, torch.float32)


def register_python_kernel(name: str, kernel: Callable[..., Any]) -> None:
    """torch.ops.vae_fast.<name>, an op declared in C++ and called from C++, implemented by
    `kernel` in Python for every device: a decomposition into the torch ops it runs, which
    autograd differentiates and torch.compile traces (CompositeImplicitAutograd), and
    which runs on batched tensors under torch.func.vmap and the older vmap of
    ``autograd.grad(is_grads_batched=True)`` (their Batched keys), whose fallbacks cannot
    return its list of optional gradients."""
    if LOAD_ERROR is None:
        for key in ("CompositeImplicitAutograd", "FuncTorchBatchedDecomposition", "Batched"):
            torch.library.impl(f"vae_fast::{name}", key, lib=_LIB)(kernel)


def _one_device(name: str, fake: Callable[..., Any]) -> Callable[..., Any]:
    """`fake`, refusing meta tensors mixed with real ones: the dispatcher sends such a call
    to the fake kernel, whose outputs would be uninitialized tensors on the real device."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        # (A 0-d CPU tensor, such as beta, goes with any device, as in torch.)
        tensors = [
            a
            for a in (*args, *kwargs.values())
            if isinstance(a, torch.Tensor) and not (a.dim() == 0 and a.device.type == "cpu")
        ]
        meta = [t for t in tensors if t.device.type == "meta"]
        if meta and len(meta) < len(tensors):
            other = next(t.device for t in tensors if t.device.type != "meta")
            raise RuntimeError(
                f"vae_fast.{name}: some tensor arguments are on the meta device and some on "
                f"{other}; all must be on one device"
            )
        return fake(*args, **kwargs)

    return checked


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """What an op returns for a gradient that was not asked for."""
    return like.new_empty((0,))


def wanted(grads, needs) -> tuple[torch.Tensor | None, ...]:
    """The gradients autograd asked for; the ops return empty tensors for the others."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def batch_shape(x: torch.Tensor, event_dims: int) -> tuple[int, ...]:
    return tuple(x.shape[: x.dim() - event_dims])


def like_or_empty(want: bool, like: torch.Tensor | None, fallback: torch.Tensor):
    """A fake kernel's gradient output: `like`'s shape when computed (contiguous, as the
    kernels allocate it whatever `like`'s strides), else empty."""
    return like.new_empty(like.shape) if want and like is not None else empty_grad(fallback)
