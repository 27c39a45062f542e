"""The exercise checkers: they pass the reference, catch the classic mistakes with a clear message,
and every worked solution in the book passes its checker."""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch

from conftest import chapter_notebooks
from qlib import exercises as ex


def srdhm(a, b, saturate=True, floor=False):
    if saturate and a == b == -(2**31):
        return 2**31 - 1
    product = a * b
    total = product + (2**30 if product >= 0 else 1 - 2**30)
    if floor:
        return total // 2**31
    return abs(total) // 2**31 * (1 if total >= 0 else -1)


def test_srdhm_checker():
    assert ex.check_srdhm(srdhm)
    result = ex.check_srdhm(lambda a, b: srdhm(a, b, saturate=False))
    assert not result and "a=-2147483648, b=-2147483648" in result.message and "saturating" in str(result)
    result = ex.check_srdhm(lambda a, b: srdhm(a, b, floor=True))
    assert not result and "expected -2147483647" in result.message


def test_quantize_checker():
    assert ex.check_quantize(lambda x, s, z, lo, hi: np.clip(np.round(x / s) + z, lo, hi).astype(np.int64))
    result = ex.check_quantize(lambda x, s, z, lo, hi: np.clip(np.floor(x / s + 0.5) + z, lo, hi))
    assert not result and "returned 1.0, expected 0" in result.message
    result = ex.check_quantize(lambda x, s, z, lo, hi: np.round(x / s) + z)     # no clamp
    assert not result and "expected" in result.message
    result = ex.check_quantize(lambda x, s, z, lo, hi: np.round(x / s)[:1])
    assert not result and "shape" in result.message


class LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, s, qn, qp):
        u = v / s
        ctx.save_for_backward(u)
        ctx.qn, ctx.qp = qn, qp
        return s * torch.round(torch.clamp(u, -qn, qp))

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        inside = (u > -ctx.qn) & (u < ctx.qp)
        ds = torch.where(inside, torch.round(u) - u,
                         torch.where(u <= -ctx.qn, torch.full_like(u, -float(ctx.qn)), torch.full_like(u, float(ctx.qp))))
        return grad * inside, (grad * ds).sum().reshape(1), None, None


class NoClipGradient(LSQFunction):
    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        inside = (u > -ctx.qn) & (u < ctx.qp)
        return grad * inside, (grad * torch.where(inside, torch.round(u) - u, 0.0)).sum().reshape(1), None, None


def test_lsq_checker():
    assert ex.check_lsq_function(LSQFunction)
    result = ex.check_lsq_function(NoClipGradient)       # forgets the clipped values' pull on s
    assert not result and "d out / d s" in result.message

    def through_autograd(v, s, qn, qp):   # the STE by detach: autograd then gives LSQ's step gradient
        u = torch.clamp(v / s, -qn, qp)
        return s * (u + (torch.round(u) - u).detach())

    assert ex.check_lsq_function(through_autograd)
    result = ex.check_lsq_function(lambda v, s, qn, qp: through_autograd(v, s.detach(), qn, qp))
    assert not result and "d out / d s" in result.message


def test_shift_add_checker():
    def shift_add(x, w):
        total = 0
        for e in range(int(w.abs().max()).bit_length()):
            bit = ((w.abs() >> e) & 1).bool()
            total += int((x << e)[bit & (w > 0)].sum()) - int((x << e)[bit & (w < 0)].sum())
        return total

    assert ex.check_shift_add_dot(shift_add)
    result = ex.check_shift_add_dot(lambda x, w: int((x * w.abs()).sum()))   # loses the signs
    assert not result and "expected 42" in result.message


def test_rounding_regularizer_checker():
    assert ex.check_rounding_regularizer(lambda h, beta: (1 - (2 * h - 1).abs() ** beta).sum())
    result = ex.check_rounding_regularizer(lambda h, beta: (1 - (2 * h - 1) ** 2).sum())   # beta ignored
    assert not result and "beta=20.0" in result.message
    result = ex.check_rounding_regularizer(lambda h, beta: (1 - (2 * h - 1).abs() ** beta).sum().item())
    assert not result and "one-element tensor" in result.message


def test_a_failing_function_is_a_verdict_not_a_crash():
    result = ex.check_srdhm(lambda a, b: 1 // 0)
    assert not result and result.message.startswith("raised ZeroDivisionError")
    with pytest.raises(TypeError, match="must be callable"):
        ex.check_srdhm(42)


def test_repeatable():
    assert ex.check_srdhm(srdhm).cases == ex.check_srdhm(srdhm).cases


SOLUTION = re.compile(r":::\{solution\}.*?```python\n(.*?)```", re.S)


def worked_solutions():
    for path in chapter_notebooks():
        text = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                       if c["cell_type"] == "markdown")
        for block in SOLUTION.findall(text):
            if "qlib.exercises" in block:
                checker = re.search(r"check_\w+", block).group()
                yield pytest.param(block, id=f"{path.stem}:{checker}")


@pytest.mark.parametrize("code", list(worked_solutions()))
def test_every_worked_solution_passes_its_checker(code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<solution>", "exec"), {})
    assert out.getvalue().startswith("✓"), out.getvalue()


def test_the_book_has_checked_exercises():
    assert len(list(worked_solutions())) >= 4
