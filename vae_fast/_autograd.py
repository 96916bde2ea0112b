"""How the vae_fast operators are differentiated: one route for every caller.

Each operator has one autograd Function, registered as its kernel for torch's
Autograd dispatch key: an ``autograd.Function`` made here, or for ``elbo``, the loss
called once per training step, a C++ one with the same behaviour
(csrc/elbo_autograd.cpp, whose uncommon backwards call back into Python through
torch.ops.vae_fast._elbo_backward), as a Python Function's fixed cost is larger than
the fused kernel at small batches. Every call reaches an operator through the
dispatcher (the public functions, a compiled graph, a direct ``torch.ops.vae_fast``
call), so that one Function serves them all:

- an ordinary backward runs the operator's fused backward (for ``elbo``, the
  gradients its forward pass already computed);
- a backward that is itself recorded (``create_graph=True``: gradient penalties,
  Hessian-vector products; and ``torch.func.grad``, which always records) runs the
  vector-Jacobian product of the operator's plain-torch reference instead, which
  torch differentiates again to any order;
- forward-mode AD and the torch.func transforms (vmap, jvp, jacfwd, ...) reach the
  public functions, which run the reference there (`runs_reference`), eager or
  compiled; a direct ``torch.ops.vae_fast`` call under them raises a vae_fast error
  where it would record a graph or carry a tangent; otherwise vmap runs it row by row
  (torch's fallback; reparameterize's own rule, see ops.py, draws each row anew only
  for randomness="different").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from vae_fast._backend import current_backend

_LIB = torch.library.Library("vae_fast", "IMPL")  # kept alive: registrations die with it


def runs_reference(*tensors: Any) -> bool:
    """Whether a public function runs `vae_fast.reference` instead of the fused op:
    under ``vae_fast.backend("reference")``, inside a torch.func transform, or when an
    input carries a forward-mode tangent. The fused kernels have no batching rule and
    no forward derivative; the reference is plain torch, which has both."""
    if current_backend() == "reference":
        return True
    # torch.compile traces torch.func transforms and forward AD too, and reads both
    # as they are at trace time.
    if torch._C._are_functorch_transforms_active():
        return True
    # No dual level is open (the common case): no input can carry a tangent.
    return fwAD._current_level >= 0 and _has_tangent(tensors)


def _has_tangent(tensors: Sequence[Any]) -> bool:
    return any(
        isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tensors
    )


def reference_vjp(
    reference: Callable[..., tuple[torch.Tensor, ...]],
    inputs: Sequence[Any],
    needs: Sequence[bool],
    grads: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of `reference(*inputs)` for the cotangents `grads` (None: zero),
    for the inputs in `needs`. Recorded when grad mode is on (this is the backward for
    create_graph=True), so that they can be differentiated again. An input that no
    output with a cotangent depends on gets None, as torch's own backward gives."""
    positions = [
        i for i, (t, need) in enumerate(zip(inputs, needs)) if need and isinstance(t, torch.Tensor)
    ]
    result: list[torch.Tensor | None] = [None] * len(inputs)
    if torch._C._are_functorch_transforms_active():
        # Inside torch.func, its own vjp (torch.autograd.grad does not see its levels);
        # it gives zeros, not None, for an input the outputs do not depend on.
        def of_differentiable(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            args = list(inputs)
            for i, t in zip(positions, tensors):
                args[i] = t
            return reference(*args)

        outputs, vjp = torch.func.vjp(of_differentiable, *(inputs[i] for i in positions))
        cotangents = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads))
        for i, g in zip(positions, vjp(cotangents)):
            result[i] = g
        return tuple(result)
    record = torch.is_grad_enabled()
    args = list(inputs)
    for i in positions:
        # Each input a variable of its own, even where two are views of one tensor (a
        # gradient with respect to the base would count both); a first-order backward
        # builds a graph of its own, on detached inputs.
        t = inputs[i]
        args[i] = t.view_as(t) if record else t.detach().requires_grad_()
    with torch.enable_grad():
        outputs = reference(*args)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    if pairs and positions:
        got = torch.autograd.grad(
            [o for o, _ in pairs],
            [args[i] for i in positions],
            [g for _, g in pairs],
            create_graph=record,
            allow_unused=True,
        )
        for i, g in zip(positions, got):
            result[i] = g
    return tuple(result)


@dataclass(frozen=True)
class _Dispatch:
    """What the Function's forward needs to call the kernel below autograd."""

    keyset: Any
    keyword_only: dict[str, Any]


def register(
    name: str,
    setup_context: Callable[[Any, tuple[Any, ...], Any], None],
    backward: Callable[..., tuple[torch.Tensor | None, ...]],
    *,
    overwritten: int | None = None,
    check_call: Callable[[tuple[Any, ...], bool], None] | None = None,
) -> None:
    """Registers the autograd of torch.ops.vae_fast.<name>: `setup_context(ctx, inputs,
    output)` saves what `backward(ctx, *grads)` needs; backward returns one gradient
    (or None) per positional input.

    For an op that writes over an input (its schema's ``Tensor(a!)``): `overwritten` is
    that input's position, whose version a call that autograd does not record bumps
    (setup_context does it for one that it records, before saving anything), so that a
    backward that saved it raises instead of reading the new values; `check_call(inputs,
    recording)` runs before every call, while the input is still intact."""
    op = getattr(torch.ops.vae_fast, name).default
    # The dispatcher drops trailing arguments equal to their defaults; setup_context
    # sees them all.
    defaults = tuple(a.default_value for a in op._schema.arguments if not a.kwarg_only)

    def forward(*args: Any) -> Any:
        *inputs, dispatch = args
        # Below the Autograd key, as torch.library.register_autograd calls the kernel.
        with torch._C._AutoDispatchBelowAutograd():
            keyset = dispatch.keyset & torch._C._after_autograd_keyset
            return op.redispatch(keyset, *inputs, **dispatch.keyword_only)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        setup_context(ctx, inputs[:-1], output)

    def backward_all(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return (*backward(ctx, *grads), None)

    def no_rule(*_: Any) -> Any:
        raise RuntimeError(
            f"vae_fast: torch.ops.vae_fast.{name} has no forward-mode derivative or vmap rule "
            "of its own; call the public vae_fast function (it runs vae_fast.reference under "
            "forward AD and torch.func transforms) or use `with vae_fast.backend('reference'):`"
        )

    function = type(
        f"{name.strip('_')}_autograd",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup),
            "backward": staticmethod(backward_all),
            "jvp": staticmethod(no_rule),
            "vmap": staticmethod(no_rule),
        },
    )

    def autograd_kernel(keyset: Any, *args: Any, **keyword_only: Any) -> Any:
        dispatch = _Dispatch(keyset, keyword_only)
        args = args + defaults[len(args) :]
        recording = torch.is_grad_enabled() and torch._C._any_requires_grad(*args)
        if check_call is not None:
            check_call(args, recording)
        try:
            if not recording:
                if fwAD._current_level >= 0 and _has_tangent(args):
                    no_rule()  # a tangent would be dropped
                output = forward(*args, dispatch)
                if overwritten is not None:
                    torch.autograd.graph.increment_version(args[overwritten])
                return output
            if torch._C._are_functorch_transforms_active():
                return function.apply(*args, dispatch)
            # Function.apply's own preamble binds the arguments to forward's signature
            # with inspect (~30 us a call) and checks for torch.func; with every argument
            # given and no transform active, the C++ apply below it does the same work.
            return super(torch.autograd.Function, function).apply(*args, dispatch)
        except Exception:
            # An error found in the pass (targets outside [0, 1]) comes after the input
            # was partly written over: a backward that saved it must still refuse it.
            if overwritten is not None:
                torch.autograd.graph.increment_version(args[overwritten])
            raise

    _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def register_first_order_only(name: str) -> None:
    """A private backward op computes first derivatives only: differentiating it raises
    (the Functions above never record it: a recorded backward runs the reference)."""

    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(
            f"vae_fast: {name} has no derivative of its own; the vae_fast ops differentiate "
            "their backward through vae_fast.reference (call the public functions)"
        )

    torch.library.register_autograd(f"vae_fast::{name}", backward)


def _is_batched(t: torch.Tensor) -> bool:
    """Whether t carries a vmap batch dim: torch.func's, or the older vmap's that
    ``torch.autograd.grad(is_grads_batched=True)`` and ``jacobian(vectorize=True)`` use."""
    return torch._C._functorch.is_batchedtensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


def is_exactly_one(t: torch.Tensor) -> bool:
    """Whether grad_output is exactly 1, so that saved gradients need no scaling. Reading
    a value is free on the CPU; elsewhere it is a host sync, so it is never read there
    (and compiled graphs always scale: the check depends on data; so does a backward
    under vmap, whose grad_output is batched: is_grads_batched, vectorized jacobians)."""
    return (
        t.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not _is_batched(t)
        and t.numel() == 1
        and t.item() == 1
    )


def hand_back(
    grads: Sequence[torch.Tensor | None],
    grad_output: torch.Tensor,
    scale_shapes: Sequence[Sequence[int] | None] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients computed in the forward pass (for grad_output = 1), times grad_output.

    When the graph is freed after this backward they are scaled in place and handed
    over as they are (no copy); when it is retained, as new tensors the caller owns, so
    that clipping them in place cannot change what a later backward reads.
    `scale_shapes[i]`: the shape grad_output is viewed as to scale grads[i] (a per-row
    grad_output against a gradient with more dims); None scales by it as it is."""
    # Out of place also for a batched grad_output (a backward under vmap): the saved
    # gradient is one, the result has one per batch entry.
    keep_graph = torch._C._autograd._get_current_graph_task_keep_graph()
    out_of_place = keep_graph or _is_batched(grad_output)
    one = is_exactly_one(grad_output)
    out = []
    for i, g in enumerate(grads):
        if g is not None and not one:
            scale = grad_output.to(g.dtype)
            if scale_shapes is not None and scale_shapes[i] is not None:
                scale = scale.reshape(scale_shapes[i])
            g = g * scale if out_of_place else g.mul_(scale)
        elif g is not None and keep_graph:
            g = g.clone()
        out.append(g)
    return tuple(out)
