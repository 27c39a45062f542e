"""EWGS: element-wise gradient scaling (Lee, Kim and Ham 2021), chapter 7.

The straight-through estimator hands every element the same gradient, however far its value was
moved by rounding. EWGS scales each element's gradient by how the move relates to the gradient's
sign:

    g_in = g_out * (1 + delta * sign(g_out) * (u - u_q)),

``u`` the discretizer's input and ``u_q`` its output. A descent step moves ``u`` by ``-g``; if the
element was rounded *up* (``u - u_q < 0``) and the step would push it further down (``g > 0``),
the gradient shrinks, and the other way round. ``delta >= 0`` sets the strength: 0 is the STE.

The paper sets ``delta`` from the curvature: ``delta = (Tr(H) / N) / G``, with ``H`` the Hessian of
the loss with respect to the discretizer's output (``N`` elements) and ``G = 3 std(g)`` a typical
gradient size. :func:`qlib.quantizers.estimate_ewgs_deltas` estimates it with Hutchinson's method
(:mod:`qlib.hessian`), separately for the weights and the activations of each layer;
:class:`EWGSSchedule` re-estimates it during training and keeps a log.

The product ``delta * (u - u_q)`` does not depend on the units of ``u``: in units ``c`` times
larger, the error grows by ``c`` and ``Tr(H) / N / std(g)`` shrinks by ``c``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float, check_int
from ..hessian import gradient_graph, hutchinson_trace
from .base import Rounding, enclosing_levels

__all__ = ["EWGS", "ewgs_discretize", "ewgs_quantizers", "estimate_ewgs_deltas", "EWGSSchedule"]


class _ElementwiseGradientScaling(torch.autograd.Function):
    """Forward: ``u_q``. Backward: ``g (1 + delta sign(g) error)``; counts the gradients it flips."""

    @staticmethod
    def forward(ctx, u, u_q, error, delta, flip_counts):
        ctx.save_for_backward(error, delta)
        ctx.flip_counts = flip_counts
        return u_q.clone()

    @staticmethod
    def backward(ctx, g):
        error, delta = ctx.saved_tensors
        factor = 1 + delta * torch.sign(g) * error
        if ctx.flip_counts is not None:
            with torch.no_grad():
                ctx.flip_counts[0] += (factor < 0).sum()
                ctx.flip_counts[1] += factor.numel()
        return g * factor, None, None, None, None


def ewgs_discretize(u: torch.Tensor, u_q: torch.Tensor, delta, error: torch.Tensor | None = None,
                    flip_counts: torch.Tensor | None = None) -> torch.Tensor:
    """``u_q`` in the forward pass, EWGS's scaled gradient with respect to ``u`` in the backward pass.

    ``error`` defaults to ``u - u_q``; ``delta`` is a float or 0-d tensor (no gradient flows to it).
    ``flip_counts`` (a 2-element tensor), if given, accumulates how many gradients the backward
    pass turned around (factor < 0) and how many it saw.
    """
    if not isinstance(u, torch.Tensor) or not isinstance(u_q, torch.Tensor) or u.shape != u_q.shape:
        raise ValueError("u and u_q must be tensors of the same shape")
    error = (u - u_q).detach() if error is None else error.detach()
    delta = torch.as_tensor(delta, dtype=u.dtype, device=u.device).detach()
    return _ElementwiseGradientScaling.apply(u, u_q.detach(), error, delta, flip_counts)


class EWGS(Rounding):
    """EWGS's rounding gradient: ``g_in = g_out (1 + delta sign(g_out) (u - u_q))``.

    ``ewgs_delta`` (a buffer, 0 until :func:`estimate_ewgs_deltas` sets it: the STE) is the
    strength. While ``capture`` is true, the output of the latest forward pass is kept in
    ``captured`` (the tensor the Hessian is taken with respect to). ``flip_counts`` and
    ``peak_scaled_error`` count, in training, how many gradients the factor turned around and the
    largest ``delta |u - u_q|`` (above 1 a factor can turn negative).

    ``fix`` changes what EWGS sees on an uneven grid (chapter 8): ``"gap"`` measures the error in
    units of the local gap between levels, times the uniform step over the same range (so that
    ``|error|`` is at most half a uniform step, as EWGS assumes); ``"bound"`` caps ``delta`` at
    ``1 / max|u - u_q|`` so that no factor turns negative. On a uniform grid both change nothing.
    """

    FIXES = (None, "gap", "bound")

    def __init__(self, delta: float = 0.0, fix: str | None = None):
        super().__init__()
        if fix not in self.FIXES:
            raise ValueError(f"fix must be one of {self.FIXES}, got {fix!r}")
        self.fix = fix
        self.register_buffer("ewgs_delta", torch.tensor(check_float(delta, "delta", 0.0)))
        self.register_buffer("flip_counts", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("peak_scaled_error", torch.zeros((), dtype=torch.float64))
        self.capture = False
        self.captured = None

    def error(self, u, u_q, levels):
        """The rounding error EWGS scales by: ``u - u_q``, or in units of the local gap (``fix="gap"``)."""
        error = (u - u_q).detach()
        if self.fix == "gap" and levels is not None:
            lower, upper = enclosing_levels(u, levels)
            error = error / (upper - lower) * (levels[-1] - levels[0]) / (len(levels) - 1)
        return error

    def effective_delta(self, error: torch.Tensor) -> torch.Tensor:
        """The ``delta`` the backward pass uses (capped with ``fix="bound"``)."""
        if self.fix == "bound" and error.numel():
            return torch.minimum(self.ewgs_delta, 1 / error.abs().max().clamp(min=1e-12))
        return self.ewgs_delta

    def round(self, u, u_q, levels):
        error = self.error(u, u_q, levels)
        delta = self.effective_delta(error)
        if self.training and error.numel():
            with torch.no_grad():  # the factor can turn negative only where delta * |error| > 1
                self.peak_scaled_error.clamp_(min=(delta * error.abs().max()).double())
        out = ewgs_discretize(u, u_q, delta, error, self.flip_counts if self.training else None)
        if self.capture:
            self.captured = out
        return out

    def flipped_fraction(self, reset: bool = True) -> float:
        """The fraction of backward-pass elements whose gradient sign EWGS reversed since the last reset."""
        flipped, seen = (float(v) for v in self.flip_counts)
        if reset:
            self.flip_counts.zero_()
        return flipped / seen if seen else 0.0

    def peak(self, reset: bool = True) -> float:
        """The largest ``delta * |u - u_q|`` seen in training since the last reset: the factor
        ``1 + delta sign(g) (u - u_q)`` can reverse a gradient only if this exceeds 1."""
        value = float(self.peak_scaled_error)
        if reset:
            self.peak_scaled_error.zero_()
        return value

    def extra_repr(self):
        return f"delta={float(self.ewgs_delta):.3g}, fix={self.fix}"


def ewgs_quantizers(model: nn.Module) -> dict[str, EWGS]:
    """The EWGS roundings of ``model``'s quantizers, by the quantizer's name."""
    return {name.removesuffix(".rounding"): m for name, m in model.named_modules() if isinstance(m, EWGS)}


def estimate_ewgs_deltas(model: nn.Module, batches, max_probes: int = 50, tol: float = 1e-3, seed: int = 0,
                         loss_fn=F.cross_entropy) -> dict[str, float]:
    """Set every EWGS rounding's ``delta = max(0, mean over batches of (Tr(H)/N) / (3 std(g)))``.

    As the paper's code does: the network in training mode, ``H`` the Hessian of the loss with respect
    to each quantizer's discretizer output (its diagonal block only) by Hutchinson's method, ``g`` the
    gradient with respect to that output (``std`` unbiased), averaged over ``batches`` (pairs
    ``(x, y)``; the paper uses 3) and then clipped at 0. A gradient with (near) zero spread gives
    ``delta = 0`` for that batch instead of a division by zero. The parameters and the batch-norm
    statistics are left as they were (quantizers not yet initialised initialise on the first batch,
    as in any forward pass). The batches move to the model's device. Returns the new deltas by
    quantizer name.
    """
    quantizers = ewgs_quantizers(model)
    if not quantizers:
        raise ValueError("model has no EWGS quantizer")
    max_probes = check_int(max_probes, "max_probes", 1)
    generator = torch.Generator().manual_seed(check_int(seed, "seed", 0))
    # Restore batch-norm statistics and EWGS's counters in place afterwards; loading a state dict could
    # replace parameter objects (LSQ's step) and cut them off from the optimizer that holds them.
    kept = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    kept += [b for q in quantizers.values() for b in (q.flip_counts, q.peak_scaled_error)]
    saved = [b.detach().clone() for b in kept]
    was_training = model.training
    sums = {name: 0.0 for name in quantizers}
    count = 0
    device = next(model.parameters()).device
    model.train()
    try:
        for batch in batches:
            x, y = (t.to(device) for t in batch)
            for q in quantizers.values():
                q.capture, q.captured = True, None
            loss = loss_fn(model(x), y)
            names = [n for n, q in quantizers.items() if q.captured is not None and q.captured.requires_grad]
            tensors = [quantizers[n].captured for n in names]
            if not tensors:
                raise ValueError("no EWGS quantizer took part in the forward pass (are they enabled?)")
            grads = gradient_graph(loss, tensors)
            estimate = hutchinson_trace(loss, tensors, max_probes=max_probes, tol=tol, generator=generator)
            for name, t, g, block in zip(names, tensors, grads, estimate.block_traces):
                spread = 3 * float(g.detach().std()) if g.numel() > 1 else 0.0
                if spread > 1e-12 and torch.isfinite(torch.tensor(block)):
                    sums[name] += (block / t.numel()) / spread
            count += 1
            del loss, grads, tensors
    finally:
        for q in quantizers.values():
            q.capture, q.captured = False, None
        with torch.no_grad():
            for b, value in zip(kept, saved):
                b.copy_(value)
        model.train(was_training)
    if count == 0:
        raise ValueError("batches was empty")
    deltas = {}
    for name, q in quantizers.items():
        delta = max(0.0, sums[name] / count)
        q.ewgs_delta.fill_(delta)
        deltas[name] = delta
    return deltas


class EWGSSchedule:
    """An ``on_epoch_start`` callback for :func:`qlib.train.train` that re-estimates EWGS's deltas.

    At the start of epochs ``first, first + every, ...`` it calls :func:`estimate_ewgs_deltas` on
    ``num_batches`` training batches of ``data`` (before ``first``, ``delta`` stays as it was: 0,
    the STE, unless set). ``log`` holds one row per epoch and quantizer: the ``delta`` in force and
    the fraction of gradient elements whose sign EWGS reversed during that epoch (``flipped``) and the
    largest ``delta * |u - u_q|`` (``peak``; above 1 a gradient can be reversed), filled in when the
    next epoch starts or :meth:`close` is called.
    """

    def __init__(self, data, every: int = 1, first: int = 1, num_batches: int = 3, batch_size: int = 64,
                 max_probes: int = 50, seed: int = 0):
        self.data = data
        self.every = check_int(every, "every", 1)
        self.first = check_int(first, "first", 1)
        self.num_batches = check_int(num_batches, "num_batches", 1)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.max_probes = check_int(max_probes, "max_probes", 1)
        self.seed = check_int(seed, "seed", 0)
        self.log: list[dict] = []

    def close(self, model: nn.Module):
        """Record the flipped fractions and peaks of the epoch that just ended (call after training)."""
        quantizers = ewgs_quantizers(model)
        for row in self.log:
            if row["flipped"] is None:
                row["flipped"] = quantizers[row["quantizer"]].flipped_fraction(reset=False)
                row["peak"] = quantizers[row["quantizer"]].peak(reset=False)
        for q in quantizers.values():
            q.flip_counts.zero_()
            q.peak_scaled_error.zero_()

    def __call__(self, epoch: int, model: nn.Module):
        self.close(model)
        if epoch >= self.first and (epoch - self.first) % self.every == 0:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            batches = []
            for batch in self.data.train_batches(self.batch_size, generator):
                batches.append(batch)
                if len(batches) == self.num_batches:
                    break
            estimate_ewgs_deltas(model, batches, self.max_probes, seed=self.seed + epoch)
        for name, q in ewgs_quantizers(model).items():
            self.log.append({"epoch": epoch, "quantizer": name, "delta": float(q.ewgs_delta), "flipped": None,
                             "peak": None})


