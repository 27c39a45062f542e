"""Hessian traces without the Hessian: Hutchinson's estimator (chapters 7 and 10).

For a symmetric matrix ``H`` and a random vector ``v`` with independent entries of mean 0 and
variance 1, ``E[v^T H v] = Tr(H)``. With Rademacher entries (+1 or -1) the variance of one
sample is ``2 sum_{i != j} H_ij^2``, the smallest of any such distribution. ``H v`` comes from
two backward passes (differentiate ``g . v`` where ``g`` is the gradient built with
``create_graph=True``), so the trace of a Hessian with millions of rows costs a few dozen
backward passes and never forms the matrix.

The tensors the Hessian is taken with respect to need not be parameters: EWGS takes it with
respect to each quantizer's output, an intermediate tensor of the graph. With several tensors,
``v_i^T (H v)_i`` estimates the trace of the diagonal block of tensor ``i`` from the same probes
(the off-diagonal blocks average out), so one run gives every block's trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ._checks import check_float, check_int

__all__ = ["TraceEstimate", "gradient_graph", "hessian_vector_product", "rademacher_like", "hutchinson_trace"]


@dataclass
class TraceEstimate:
    """The result of :func:`hutchinson_trace`.

    ``trace``: the estimate of ``Tr(H)`` (the mean over probes); ``block_traces``: one estimate per
    input tensor (they sum to ``trace``); ``probes``: how many probes were drawn; ``converged``:
    whether the stopping rule fired before ``max_probes``; ``history``: the running mean after each
    probe; ``block_samples``: ``v_i^T (H v)_i`` of every probe (rows) and block (columns).
    """

    trace: float
    block_traces: list[float]
    probes: int
    converged: bool
    history: list[float] = field(repr=False)
    block_samples: list[list[float]] = field(default_factory=list, repr=False)

    @property
    def block_std_errors(self) -> list[float]:
        """The standard error of each block's trace, the probes' sample standard deviation over
        ``sqrt(probes)`` (``nan`` with a single probe)."""
        k = len(self.block_samples)
        if k < 2:
            return [float("nan")] * len(self.block_traces)
        columns = list(zip(*self.block_samples))
        return [math.sqrt(sum((x - sum(c) / k) ** 2 for x in c) / (k - 1) / k) for c in columns]


def _check_graph(loss, inputs) -> list[torch.Tensor]:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("loss must be a scalar torch.Tensor")
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: compute it from the inputs with autograd enabled")
    if isinstance(inputs, torch.Tensor):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ValueError("inputs must hold at least one tensor")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            raise TypeError(f"inputs[{i}] must be a torch.Tensor that requires grad")
    return inputs


def gradient_graph(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``d loss / d input`` for each input, kept differentiable (``create_graph=True``).

    Inputs that ``loss`` does not depend on get zero gradients.
    """
    inputs = _check_graph(loss, inputs)
    grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def hessian_vector_product(grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                           vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` blockwise, where ``grads = gradient_graph(loss, inputs)``; the graph is kept for reuse."""
    if len(grads) != len(inputs) or len(vectors) != len(inputs):
        raise ValueError(f"grads, inputs and vectors must have the same length, got {len(grads)}, "
                         f"{len(inputs)} and {len(vectors)}")
    for i, (v, t) in enumerate(zip(vectors, inputs)):
        if v.shape != t.shape:
            raise ValueError(f"vectors[{i}] has shape {tuple(v.shape)}, its input {tuple(t.shape)}")
    differentiable = [i for i, g in enumerate(grads) if g.requires_grad]
    out = [torch.zeros_like(t) for t in inputs]
    if differentiable:  # a loss linear in every input has H = 0
        products = torch.autograd.grad([grads[i] for i in differentiable], inputs,
                                       grad_outputs=[vectors[i] for i in differentiable],
                                       retain_graph=True, allow_unused=True)
        out = [torch.zeros_like(t) if p is None else p for p, t in zip(products, inputs)]
    return out


def rademacher_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A tensor shaped like ``t`` with independent entries +1 or -1, each with probability 1/2."""
    bits = torch.randint(0, 2, t.shape, generator=generator, device="cpu")
    return (bits * 2 - 1).to(dtype=t.dtype, device=t.device)


def hutchinson_trace(loss: torch.Tensor, inputs: Sequence[torch.Tensor], max_probes: int = 100,
                     tol: float = 1e-3, min_probes: int = 2, generator: torch.Generator | None = None
                     ) -> TraceEstimate:
    """Estimate the trace of the Hessian of ``loss`` with respect to ``inputs``.

    Draws Rademacher probes ``v`` and averages ``v^T H v``. Stops after ``max_probes``, or earlier
    (after at least ``min_probes``) when the running mean changes by less than ``tol`` relative to
    its magnitude, the rule PyHessian uses: ``|m_k - m_{k-1}| <= tol * (|m_{k-1}| + 1e-6)``.

    Parameters
    ----------
    loss : torch.Tensor
        A scalar computed from ``inputs`` with autograd enabled.
    inputs : sequence of torch.Tensor
        Parameters or intermediate tensors of the graph (``requires_grad``).
    generator : torch.Generator, optional
        Source of the probes (CPU generator), for reproducible estimates.
    """
    inputs = _check_graph(loss, inputs)
    max_probes = check_int(max_probes, "max_probes", 1)
    min_probes = check_int(min_probes, "min_probes", 1)
    tol = check_float(tol, "tol", 0.0)
    grads = gradient_graph(loss, inputs)
    sums = [0.0] * len(inputs)
    history: list[float] = []
    samples: list[list[float]] = []
    converged = False
    for k in range(1, max_probes + 1):
        vectors = [rademacher_like(t, generator) for t in inputs]
        products = hessian_vector_product(grads, inputs, vectors)
        samples.append([float((v * hv).sum()) for v, hv in zip(vectors, products)])
        sums = [s + x for s, x in zip(sums, samples[-1])]
        history.append(sum(sums) / k)
        if k >= max(min_probes, 2) and abs(history[-1] - history[-2]) <= tol * (abs(history[-2]) + 1e-6):
            converged = True
            break
    probes = len(history)
    return TraceEstimate(history[-1], [s / probes for s in sums], probes, converged, history, samples)
