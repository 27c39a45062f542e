"""Argument checks shared by qlib's public functions.

Every check raises ``TypeError`` or ``ValueError`` with a message that names the
argument and says what is allowed, so that bad input fails at the call site and
never as a NaN or a crash deep inside numpy or torch.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

MIN_BITS = 2
MAX_BITS = 16


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_float(value, name: str, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_bits(bits, name: str = "bits") -> int:
    return check_int(bits, name, MIN_BITS, MAX_BITS)


def check_choice(value, name: str, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_float_array(x, name: str = "x", allow_empty: bool = True, finite: bool = True):
    """Accept a floating numpy array or torch tensor; reject everything else clearly."""
    if isinstance(x, torch.Tensor):
        if not torch.is_floating_point(x):
            raise TypeError(f"{name} must have a floating dtype, got torch tensor of {x.dtype}")
        empty = x.numel() == 0
        if finite and not empty and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf; quantization needs finite values")
    elif isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must have a floating dtype, got numpy array of {x.dtype}")
        empty = x.size == 0
        if finite and not empty and not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or Inf; quantization needs finite values")
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if empty and not allow_empty:
        raise ValueError(f"{name} is empty; a range needs at least one value")
    return x


def check_axis(axis, ndim: int, name: str = "axis") -> int | None:
    if axis is None:
        return None
    axis = check_int(axis, name)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be None or in [{-ndim}, {ndim - 1}] for a {ndim}-d input, got {axis}")
    return axis % ndim
