"""Calibration: observers that choose the clipping range, and per-tensor vs per-channel weights.

This is chapter 2 of the book. An *observer* watches the tensors that flow through a
point of the network and, when asked, proposes the real range ``[lo, hi]`` that the
quantization grid should cover. Turning that range into a scale and zero-point is
:func:`qlib.affine.qparams_from_range`'s job, as ``torch.ao.quantization`` separates
observers from fake-quantize modules.

* :class:`MinMaxObserver`: the smallest and largest value ever seen;
* :class:`MovingAverageObserver`: an exponential moving average (EMA) of per-batch min and
  max (Jacob et al. 2018, sec. 3.1);
* :class:`PercentileObserver`: the ``(100 - p)``-th and ``p``-th percentiles;
* :class:`MSEObserver`: the range ``alpha * [min, max]`` whose grid gives the smallest mean
  squared quantization error.

Helpers apply observers and quantizers to a trained model without changing its code:
:func:`observe_outputs` and :func:`calibrate_observers`, :func:`capture_outputs` and
:func:`capture_inputs`, :func:`fake_quantize_outputs` (static or dynamic activation ranges) and
:func:`fake_quantize_weights` (per-tensor or per-channel weights).
"""

from __future__ import annotations

import abc
import copy
from contextlib import contextmanager
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from ._checks import check_axis, check_choice, check_float, check_float_array, check_int
from .affine import SCHEMES, QuantParams, fake_quantize, qparams_from_range, qparams_from_tensor, qrange, scale_zero_point

__all__ = ["Observer", "MinMaxObserver", "MovingAverageObserver", "PercentileObserver", "MSEObserver",
           "observe_outputs", "calibrate_observers", "capture_outputs", "capture_inputs", "dynamic_qparams",
           "fake_quantize_outputs", "fake_quantize_weights", "GRANULARITIES"]

GRANULARITIES = ("per-tensor", "per-channel")


def _as_tensor(x) -> torch.Tensor:
    check_float_array(x, "x", allow_empty=False)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach()


class Observer(nn.Module, abc.ABC):
    """Base class: ``forward(x)`` records statistics of ``x`` and returns ``x`` unchanged."""

    def forward(self, x):
        self.observe(_as_tensor(x))
        return x

    @abc.abstractmethod
    def observe(self, x: torch.Tensor) -> None:
        """Update the statistics with the tensor ``x``."""

    @abc.abstractmethod
    def clip_range(self, bits: int = 8, scheme: str = "asymmetric", signed: bool = False,
                   narrow_range: bool = False):
        """The real range ``(lo, hi)`` the grid should cover (floats, or arrays per channel)."""

    def qparams(self, bits: int = 8, scheme: str = "asymmetric", signed: bool = False,
                narrow_range: bool = False) -> QuantParams:
        """Scale and zero-point for the observed range."""
        lo, hi = self.clip_range(bits, scheme, signed, narrow_range)
        return qparams_from_range(lo, hi, bits, scheme, signed, narrow_range, getattr(self, "axis", None))

    def _require_data(self, seen: bool):
        if not seen:
            raise ValueError(f"{type(self).__name__} has seen no data yet: call it on a tensor first")


class _RangeObserver(Observer):
    """Keeps a (per-tensor or per-channel) min and max in buffers, so it can be saved."""

    def __init__(self, axis: int | None = None):
        super().__init__()
        self.axis = None if axis is None else check_int(axis, "axis")
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def seen(self) -> bool:
        """Whether any data has been observed."""
        return bool(torch.isfinite(self.min_val).all())

    def _batch_range(self, x: torch.Tensor):
        """Min and max of ``x`` (per channel along ``axis``), float32, on ``x``'s device."""
        x = x.detach()
        if self.axis is None:
            return x.min().float(), x.max().float()
        axis = check_axis(self.axis, x.ndim)
        flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
        return flat.amin(dim=1).float(), flat.amax(dim=1).float()

    def clip_range(self, bits=8, scheme="asymmetric", signed=False, narrow_range=False):
        self._require_data(self.seen)
        return self.min_val.double().cpu().numpy(), self.max_val.double().cpu().numpy()

    def reset(self):
        """Forget everything observed (the buffers stay on their device)."""
        self.min_val = torch.tensor(float("inf"), device=self.min_val.device)
        self.max_val = torch.tensor(float("-inf"), device=self.max_val.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A per-channel observer learns its channel count from the data: take the saved shape.
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MinMaxObserver(_RangeObserver):
    """The running minimum and maximum over everything observed (per tensor or per channel)."""

    def observe(self, x):
        lo, hi = self._batch_range(x)
        if not self.seen:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)


class MovingAverageObserver(_RangeObserver):
    """Exponential moving average of per-batch min and max.

    ``range <- decay * range + (1 - decay) * batch_range``; the first batch initialises it.
    A decay close to 1 smooths out unusual batches, as Jacob et al. recommend for
    activation ranges during training.
    """

    def __init__(self, decay: float = 0.99, axis: int | None = None):
        super().__init__(axis)
        self.decay = check_float(decay, "decay", 0.0, 1.0, high_open=True)

    def observe(self, x):
        lo, hi = self._batch_range(x)
        if not self.seen:
            self.min_val, self.max_val = lo, hi
        else:
            d = self.decay
            self.min_val = d * self.min_val + (1 - d) * lo
            self.max_val = d * self.max_val + (1 - d) * hi


class _SampleObserver(Observer):
    """Keeps a uniform random sample of everything observed (reservoir sampling), plus exact min/max."""

    def __init__(self, max_samples: int = 2**18, seed: int = 0):
        super().__init__()
        self.max_samples = check_int(max_samples, "max_samples", 1)
        self.seed = check_int(seed, "seed", 0)
        self.reset()

    def reset(self):
        self._rng = np.random.default_rng(self.seed)
        self._reservoir = np.empty(0, dtype=np.float32)
        self._count = 0
        self._min, self._max = np.inf, -np.inf

    @property
    def seen(self) -> bool:
        """Whether any data has been observed."""
        return self.count > 0

    @property
    def count(self) -> int:
        """How many values have been observed in all (the sample keeps at most ``max_samples``)."""
        return self._count

    @property
    def samples(self) -> np.ndarray:
        """The current sample: every value seen if there were at most ``max_samples``."""
        return self._reservoir

    def observe(self, x):
        values = x.detach().cpu().reshape(-1).float().numpy()
        self._min, self._max = min(self._min, float(values.min())), max(self._max, float(values.max()))
        room = self.max_samples - self._reservoir.size
        head, tail = values[:room], values[room:]
        self._reservoir = np.concatenate([self._reservoir, head])
        self._count += head.size
        if tail.size:
            # Algorithm R, vectorised: the t-th value overall replaces slot j ~ U{0..t} if j < k.
            t = self._count + np.arange(tail.size)
            slots = (self._rng.random(tail.size) * (t + 1)).astype(np.int64)
            keep = slots < self.max_samples
            slots, kept = slots[keep], tail[keep]
            # Several values may pick the same slot; the last one wins, as in the sequential algorithm.
            last_slots, first_in_reversed = np.unique(slots[::-1], return_index=True)
            self._reservoir[last_slots] = kept[::-1][first_in_reversed]
            self._count += tail.size


class PercentileObserver(_SampleObserver):
    """Clips at the ``(100 - p)``-th and ``p``-th percentiles, ignoring rare outliers."""

    def __init__(self, percentile: float = 99.99, max_samples: int = 2**18, seed: int = 0):
        super().__init__(max_samples, seed)
        self.percentile = check_float(percentile, "percentile", 50.0, 100.0, low_open=True)

    def clip_range(self, bits=8, scheme="asymmetric", signed=False, narrow_range=False):
        self._require_data(self.seen)
        lo, hi = np.percentile(self._reservoir, [100.0 - self.percentile, self.percentile])
        return float(lo), float(hi)


class MSEObserver(_SampleObserver):
    """Searches ``alpha`` in ``(0, 1]`` for the range ``alpha * [min, max]`` with the least MSE.

    Narrowing the range trades clipping error (values outside the grid) for rounding
    error (a finer grid); the best trade depends on the bit width, so :meth:`clip_range`
    takes the quantizer's settings.
    """

    def __init__(self, num_candidates: int = 100, min_fraction: float = 0.01,
                 max_samples: int = 2**18, seed: int = 0):
        super().__init__(max_samples, seed)
        self.num_candidates = check_int(num_candidates, "num_candidates", 1)
        self.min_fraction = check_float(min_fraction, "min_fraction", 0.0, 1.0, low_open=True)

    def search(self, bits=8, scheme="asymmetric", signed=False, narrow_range=False):
        """Return ``(alphas, mse)`` over the candidate grid, for plotting the trade-off."""
        from .quantizers.clip import clip_errors  # the one least-squared-error search of qlib

        check_choice(scheme, "scheme", SCHEMES)
        self._require_data(self.seen)
        qmin, qmax = qrange(bits, signed, narrow_range)
        alphas = np.linspace(self.min_fraction, 1.0, self.num_candidates)

        def project(samples, a):  # the grid of qparams_from_range(a min, a max), integer zero-point
            scale, zero_point = scale_zero_point(a * self._min, a * self._max, bits, scheme, signed, narrow_range)
            scale, zero_point = scale.double(), zero_point.double()
            return (torch.clamp(torch.round(samples / scale) + zero_point, qmin, qmax) - zero_point) * scale

        errors = clip_errors(torch.from_numpy(self._reservoir.astype(np.float64)), project, torch.from_numpy(alphas))
        return alphas, errors.numpy()

    def clip_range(self, bits=8, scheme="asymmetric", signed=False, narrow_range=False):
        alphas, errors = self.search(bits, scheme, signed, narrow_range)
        best = alphas[int(np.argmin(errors))]
        return best * self._min, best * self._max


@contextmanager
def observe_outputs(model: nn.Module, observers: Mapping[str, Observer]):
    """While the ``with`` block runs, feed each named submodule's output to its observer.

    >>> observers = {"features.2": MinMaxObserver()}
    >>> with observe_outputs(model, observers):          # doctest: +SKIP
    ...     model(calibration_batch)
    """
    modules = _named_submodules(model, observers)
    handles = [modules[name].register_forward_hook(lambda _m, _i, out, obs=obs: obs(out))
               for name, obs in observers.items()]
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate_observers(model: nn.Module, names, batches, make_observer: Callable[[], Observer]
                        ) -> dict[str, Observer]:
    """Run calibration ``batches`` through ``model`` (eval mode) with a fresh observer on each named output.

    ``batches`` yields input tensors (or ``(x, y)`` pairs, whose labels are ignored).
    """
    observers = {name: make_observer() for name in names}
    was_training = model.training
    model.eval()
    try:
        with observe_outputs(model, observers):
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        model.train(was_training)
    if any(not o.seen for o in observers.values()):
        raise ValueError("batches was empty: the observers saw no data")
    return observers


@torch.no_grad()
def capture_outputs(model: nn.Module, names, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` (in eval mode) on ``x`` and return the outputs of the named submodules."""
    return _capture(model, names, x, inputs=False)


@torch.no_grad()
def capture_inputs(model: nn.Module, names, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` (in eval mode) on ``x`` and return the (first) input of each named submodule:
    e.g. what a layer's input quantizer sees."""
    return _capture(model, names, x, inputs=True)


def _capture(model, names, x, inputs: bool):
    modules = _named_submodules(model, names)
    captured = {}

    def keep(name, value):
        captured[name] = value.detach()

    if inputs:
        handles = [modules[n].register_forward_pre_hook(lambda _m, args, n=n: keep(n, args[0])) for n in names]
    else:
        handles = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: keep(n, out)) for n in names]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in captured]
    if missing:
        raise ValueError(f"the forward pass never called {missing}")
    return {name: captured[name] for name in names}


def dynamic_qparams(bits: int = 8, scheme: str = "asymmetric", signed: bool = False,
                    narrow_range: bool = False, per_example: bool = False) -> Callable[[torch.Tensor], QuantParams]:
    """A rule that picks min-max parameters from each tensor itself (dynamic quantization).

    ``per_example=True`` gives every example of a batch (axis 0) its own range: the same result
    as running the examples one at a time, at the speed of a batch.
    """
    check_choice(scheme, "scheme", SCHEMES)
    if not isinstance(per_example, bool):
        raise TypeError(f"per_example must be a bool, got {type(per_example).__name__}")
    axis = 0 if per_example else None
    return lambda x: qparams_from_tensor(x.detach(), bits, scheme, signed, narrow_range, axis)


@contextmanager
def fake_quantize_outputs(model: nn.Module, qparams: Mapping[str, QuantParams | Callable]):
    """While the ``with`` block runs, fake-quantize each named submodule's output.

    Each value is either fixed :class:`~qlib.affine.QuantParams` (static ranges, from
    calibration) or a callable that computes them from the tensor (see
    :func:`dynamic_qparams`).
    """
    modules = _named_submodules(model, qparams)
    for name, rule in qparams.items():
        if not (isinstance(rule, QuantParams) or callable(rule)):
            raise TypeError(f"qparams[{name!r}] must be QuantParams or a callable, got {type(rule).__name__}")

    def hook(_module, _inputs, out, rule):
        return fake_quantize(out, rule if isinstance(rule, QuantParams) else rule(out))

    handles = [modules[name].register_forward_hook(lambda m, i, o, rule=rule: hook(m, i, o, rule))
               for name, rule in qparams.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def fake_quantize_weights(model: nn.Module, bits: int = 8, granularity: str = "per-channel",
                          scheme: str = "symmetric", signed: bool = True,
                          narrow_range: bool = False) -> nn.Module:
    """A copy of ``model`` whose conv and linear weights are replaced by their fake-quantized values.

    Per-channel parameters use one scale per output channel (axis 0), as in Krishnamoorthi
    (2018) and PyTorch; biases stay in float (they become int32 in the integer engine).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice(granularity, "granularity", GRANULARITIES)
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for module in quantized.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                w = module.weight
                axis = 0 if granularity == "per-channel" else None
                qp = qparams_from_tensor(w, bits, scheme, signed, narrow_range, axis)
                w.copy_(fake_quantize(w, qp))
    return quantized


def _named_submodules(model: nn.Module, names) -> dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"model has no submodule named {missing}; available: {sorted(k for k in modules if k)}")
    return modules
