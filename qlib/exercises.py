"""Checkers for the exercises in which a student implements one of the book's functions.

Each ``check_*`` calls the student's function on many inputs (edge cases first, then inputs that
hypothesis draws, with a fixed seed so that a run is repeatable) and compares it with qlib's
reference. It returns a :class:`CheckResult`, which prints one line: how many cases matched, or
the first input on which the student's function differs, with both answers::

    >>> from qlib.exercises import check_srdhm
    >>> check_srdhm(lambda a, b: (2 * a * b + 2**31) >> 32)
    ✗ srdhm: differs at a=-2147483648, b=-2147483648: returned 2147483648, expected 2147483647 (the one
    saturating case)

The checkers:

* :func:`check_quantize` (chapter 1): ``clamp(round(x / S) + Z, qmin, qmax)``, ties to even;
* :func:`check_srdhm` (chapter 3): gemmlowp's ``SaturatingRoundingDoublingHighMul`` on Python ints;
* :func:`check_lsq_function` (chapter 6): LSQ's fake quantizer as a ``torch.autograd.Function``,
  forward and both gradients;
* :func:`check_shift_add_dot` (chapter 8): a dot product with power-of-two weights by shifts and adds;
* :func:`check_rounding_regularizer` (chapter 9): AdaRound's ``sum(1 - |2h - 1|^beta)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException

from .fixedpoint import INT32_MAX, INT32_MIN, saturating_rounding_doubling_high_mul
from .ptq.adaround import rounding_regularizer

__all__ = ["CheckResult", "check_quantize", "check_srdhm", "check_lsq_function", "check_shift_add_dot",
           "check_rounding_regularizer"]

#: How many drawn cases each checker tries after its edge cases.
EXAMPLES = 300


@dataclass(frozen=True)
class CheckResult:
    """The verdict of a checker: ``passed``, the ``cases`` tried and a one-line ``message``."""

    name: str
    passed: bool
    cases: int
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return f"{'✓' if self.passed else '✗'} {self.name}: {self.message}"

    __repr__ = __str__


class _Mismatch(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _run(name: str, fn, check_one, edge_cases, strategy) -> CheckResult:
    """Run ``check_one(*case)`` on the edge cases, then on drawn ones; stop at the first mismatch."""
    if not callable(fn):
        raise TypeError(f"the function to check must be callable, got {type(fn).__name__}")
    tried = 0

    def one(case):
        nonlocal tried
        tried += 1
        try:
            check_one(*case)
        except _Mismatch:
            raise
        except Exception as error:  # the student's function failed: report it as the verdict
            raise _Mismatch(f"raised {type(error).__name__}: {error} at {_describe(case)}") from error

    try:
        for case in edge_cases:
            one(case)

        @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), phases=("generate",))
        @given(strategy)
        def drawn(case):
            one(case)

        drawn()
    except _Mismatch as mismatch:
        return CheckResult(name, False, tried, mismatch.message)
    except HypothesisException as error:   # pragma: no cover - a checker's own bug, not the student's
        raise RuntimeError(f"checker {name} failed: {error}") from error
    return CheckResult(name, True, tried, f"all {tried} cases match the reference")


def _describe(case) -> str:
    def short(v):
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)}" if v.numel() > 6 else f"tensor({v.tolist()})"
        if isinstance(v, np.ndarray):
            return f"array{v.shape}" if v.size > 6 else f"array({v.tolist()})"
        return repr(v)
    return ", ".join(short(v) for v in case)


# -- chapter 1: the affine map --------------------------------------------------------------

def check_quantize(fn) -> CheckResult:
    """``fn(x, scale, zero_point, qmin, qmax)`` -> integer codes ``clamp(round(x / S) + Z, qmin, qmax)``.

    ``x`` is a float64 numpy array; ``round`` takes ties to even (numpy's and torch's rule). The
    codes are compared as integers, so any integer or integral float dtype is accepted.
    """
    def reference(x, scale, zero_point, qmin, qmax):
        return np.clip(np.round(x / scale) + zero_point, qmin, qmax)

    def check_one(x, scale, zero_point, qmin, qmax):
        got = np.asarray(fn(x.copy(), scale, zero_point, qmin, qmax))
        want = reference(x, scale, zero_point, qmin, qmax)
        if got.shape != want.shape:
            raise _Mismatch(f"returned shape {got.shape}, expected {want.shape} at "
                            f"{_describe((x, scale, zero_point, qmin, qmax))}")
        if not np.array_equal(got.astype(np.float64), want):
            i = int(np.flatnonzero(got.astype(np.float64).ravel() != want.ravel())[0])
            raise _Mismatch(f"differs at x={float(x.ravel()[i])!r} (scale={scale}, zero_point={zero_point}, "
                            f"range [{qmin}, {qmax}]): returned {got.ravel()[i]}, expected {int(want.ravel()[i])}")

    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5]) * 0.1
    edges = [(ties, 0.1, 0, -128, 127),                          # x / S exactly half-way: ties to even
             (np.array([-1.0, 0.0, 3.0]), 4 / 255, 64, 0, 255),  # the chapter's [-1, 3] example
             (np.array([-1e6, 1e6]), 0.01, 3, 0, 255)]           # far outside: clamped
    scales = st.floats(1e-4, 10.0)
    strategy = st.tuples(
        st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20).map(np.array),
        scales, st.integers(-128, 255), st.sampled_from([(-128, 127), (0, 255), (-8, 7), (0, 15)]),
    ).map(lambda t: (t[0], t[1], t[2], *t[3]))
    return _run("quantize", fn, check_one, edges, strategy)


# -- chapter 3: fixed-point requantization ------------------------------------------------------

def check_srdhm(fn) -> CheckResult:
    """``fn(a, b)`` on Python ints in the int32 range -> gemmlowp's ``SaturatingRoundingDoublingHighMul``:
    ``a b / 2^31`` rounded to nearest with ties toward +inf, ``INT32_MIN * INT32_MIN`` saturating."""
    def check_one(a, b):
        got = fn(a, b)
        want = int(saturating_rounding_doubling_high_mul(np.array([a]), np.array([b]))[0])
        if got != want:
            hint = " (the one saturating case)" if a == b == INT32_MIN else ""
            raise _Mismatch(f"differs at a={a}, b={b}: returned {got}, expected {want}{hint}")

    edges = [(INT32_MIN, INT32_MIN), (INT32_MAX, INT32_MAX), (INT32_MIN, INT32_MAX), (0, 12345),
             (1, 1 << 30), (-1, 1 << 30), (3, 1 << 30), (-3, 1 << 30), (INT32_MIN, 1), (2**30, 2**30)]
    int32s = st.integers(INT32_MIN, INT32_MAX)
    return _run("srdhm", fn, check_one, edges, st.tuples(int32s, int32s))


# -- chapter 6: LSQ ------------------------------------------------------------------------------

def _lsq_reference(v, s, qn, qp):
    """Forward value and the two gradients of LSQ's fake quantizer for an upstream gradient of ones."""
    u = v / s
    inside = (u > -qn) & (u < qp)
    forward = s * torch.round(torch.clamp(u, -qn, qp))
    grad_v = inside.to(v.dtype)
    grad_s = torch.where(inside, torch.round(u) - u, torch.where(u <= -qn, -float(qn) * torch.ones_like(u),
                                                                 float(qp) * torch.ones_like(u)))
    return forward, grad_v, grad_s


def check_lsq_function(function) -> CheckResult:
    """``function.apply(v, s, qn, qp)``: LSQ's ``s * round(clamp(v / s, -qn, qp))`` with the STE.

    ``function`` is a ``torch.autograd.Function`` subclass (or any callable ``f(v, s, qn, qp)``);
    ``s`` is a one-element tensor that requires a gradient. Checked: the forward values, the
    gradient with respect to ``v`` (1 inside the range, 0 outside) and the gradient with respect
    to ``s``, summed over the elements (``round(v/s) - v/s`` inside, ``-qn`` or ``qp`` outside),
    for an upstream gradient of ones and without LSQ's gradient scale. Values exactly on a bound,
    where the derivative depends on the convention, are left out.
    """
    call = function.apply if isinstance(function, type) and issubclass(function, torch.autograd.Function) else function

    def check_one(values, step, qn, qp):
        # exactly on a bound the derivative is a convention (the paper's < or autograd's <=): skip those
        values = [x for x in values if x / step not in (-qn, qp)]
        if not values:
            return
        v = torch.tensor(values, dtype=torch.float64, requires_grad=True)
        s = torch.tensor([step], dtype=torch.float64, requires_grad=True)
        out = call(v, s, qn, qp)
        want_out, want_gv, want_gs = _lsq_reference(v.detach(), s.detach(), qn, qp)
        where = f"v={values}, s={step}, qn={qn}, qp={qp}"
        if not isinstance(out, torch.Tensor) or out.shape != v.shape:
            raise _Mismatch(f"returned {type(out).__name__} {getattr(out, 'shape', '')}, expected a tensor "
                            f"shaped like v at {where}")
        if not torch.allclose(out.detach(), want_out, rtol=1e-9, atol=1e-12):
            raise _Mismatch(f"forward differs at {where}: returned {out.detach().tolist()}, expected "
                            f"{want_out.tolist()}")
        grad_v, grad_s = torch.autograd.grad(out, (v, s), torch.ones_like(out), allow_unused=True)
        if grad_v is None or not torch.allclose(grad_v, want_gv):
            raise _Mismatch(f"d out / d v differs at {where}: returned "
                            f"{None if grad_v is None else grad_v.tolist()}, expected {want_gv.tolist()}")
        if grad_s is None or not torch.allclose(grad_s.sum(), want_gs.sum(), rtol=1e-7, atol=1e-9):
            raise _Mismatch(f"d out / d s differs at {where}: returned "
                            f"{None if grad_s is None else float(grad_s.sum())}, expected {float(want_gs.sum())}")

    edges = [([0.26, 0.74, 1.3, -0.2], 0.5, 0, 3),         # inside, both roundings; clipped below
             ([-2.0, -0.9, 0.0, 0.9, 2.0], 0.5, 2, 1),      # signed: clipped at both ends
             ([10.0], 1.0, 4, 3)]                           # far above the range
    values = st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=12)
    bounds = st.sampled_from([(0, 3), (0, 15), (2, 1), (8, 7), (128, 127)])
    strategy = st.tuples(values, st.floats(0.01, 5.0), bounds).map(lambda t: (t[0], t[1], *t[2]))
    return _run("lsq_function", function, check_one, edges, strategy)


# -- chapter 8: shift-add --------------------------------------------------------------------

def check_shift_add_dot(fn) -> CheckResult:
    """``fn(x, w)`` -> ``sum x_i w_i`` as a Python int, for int64 tensors ``x`` (centred activation codes)
    and ``w`` (weight codes whose magnitudes are sums of powers of two, APoT's). The point of the
    exercise is to use shifts and additions only; the checker can check the answer, not the means."""
    def check_one(x, w):
        got = fn(x.clone(), w.clone())
        want = int((x * w).sum())
        if int(got) != want or (isinstance(got, torch.Tensor) and got.is_floating_point()):
            raise _Mismatch(f"differs at x={x.tolist()}, w={w.tolist()}: returned {got!r}, expected {want}")

    apot = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 16, 17, 18, 20, 24]   # sums of at most two powers of two
    edges = [(torch.tensor([3, -5, 7]), torch.tensor([4, -6, 0])),
             (torch.tensor([-255, 255]), torch.tensor([-24, 24])),
             (torch.tensor([0]), torch.tensor([0]))]
    pairs = st.integers(1, 16).flatmap(lambda n: st.tuples(
        st.lists(st.integers(-255, 255), min_size=n, max_size=n),
        st.lists(st.sampled_from(apot), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n)))
    strategy = pairs.map(lambda t: (torch.tensor(t[0]), torch.tensor([-m if neg else m for m, neg in zip(t[1], t[2])])))
    return _run("shift_add_dot", fn, check_one, edges, strategy)


# -- chapter 9: AdaRound -----------------------------------------------------------------------

def check_rounding_regularizer(fn) -> CheckResult:
    """``fn(h, beta)`` -> AdaRound's ``sum(1 - |2h - 1|^beta)`` as a scalar tensor, and its gradient
    with respect to ``h`` (checked where ``h`` is not exactly 1/2, at which ``|.|`` has no derivative)."""
    def check_one(values, beta):
        h = torch.tensor(values, dtype=torch.float64, requires_grad=True)
        got = fn(h, beta)
        reference_h = h.detach().clone().requires_grad_(True)
        want = rounding_regularizer(reference_h, beta)
        where = f"h={values}, beta={beta}"
        if not isinstance(got, torch.Tensor) or got.numel() != 1:
            raise _Mismatch(f"returned {type(got).__name__}, expected a one-element tensor at {where}")
        if not torch.allclose(got.detach().reshape(()), want.detach(), rtol=1e-9, atol=1e-12):
            raise _Mismatch(f"differs at {where}: returned {float(got.detach())}, expected {float(want.detach())}")
        (grad,) = torch.autograd.grad(got.reshape(()), h, allow_unused=True)
        (want_grad,) = torch.autograd.grad(want, reference_h)
        if grad is None or not torch.allclose(grad, want_grad, rtol=1e-7, atol=1e-9):
            raise _Mismatch(f"the gradient differs at {where}: returned "
                            f"{None if grad is None else grad.tolist()}, expected {want_grad.tolist()}")

    edges = [([0.0, 1.0], 2.0), ([0.25, 0.75], 2.0), ([0.1, 0.9, 0.3], 20.0)]
    unit = st.floats(0.0, 1.0).filter(lambda v: v != 0.5)
    strategy = st.tuples(st.lists(unit, min_size=1, max_size=10), st.floats(2.0, 20.0))
    return _run("rounding_regularizer", fn, check_one, edges, strategy)
