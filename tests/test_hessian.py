"""Hutchinson's trace estimator against exact Hessians of small problems."""

import math

import pytest
import torch
from torch import nn

from qlib.hessian import gradient_graph, hessian_vector_product, hutchinson_trace, rademacher_like


def small_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    return model, x, y


def exact_hessian(model, x, y):
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss_of(flat):
        chunks, start = [], 0
        for shape, size in zip(shapes, sizes):
            chunks.append(flat[start:start + size].reshape(shape))
            start += size
        w1, b1, w2, b2 = chunks
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(loss_of, flat), sizes


def test_hessian_vector_product_equals_the_exact_product():
    model, x, y = small_problem()
    H, sizes = exact_hessian(model, x, y)
    params = list(model.parameters())
    loss = ((model(x) - y) ** 2).mean()
    grads = gradient_graph(loss, params)
    vectors = [torch.randn_like(p) for p in params]
    products = hessian_vector_product(grads, params, vectors)
    expected = H @ torch.cat([v.reshape(-1) for v in vectors])
    assert torch.allclose(torch.cat([p.reshape(-1) for p in products]), expected, atol=1e-5)


def test_hutchinson_trace_is_within_its_standard_error_of_the_exact_trace():
    model, x, y = small_problem()
    H, sizes = exact_hessian(model, x, y)
    loss = ((model(x) - y) ** 2).mean()
    probes = 2000
    estimate = hutchinson_trace(loss, list(model.parameters()), max_probes=probes, tol=0.0,
                                generator=torch.Generator().manual_seed(0))
    assert estimate.probes == probes and not estimate.converged
    # one Rademacher sample has variance 2 * sum of squared off-diagonal entries
    variance = 2 * ((H**2).sum() - (H.diagonal() ** 2).sum()).item()
    assert abs(estimate.trace - H.trace().item()) < 4 * math.sqrt(variance / probes)
    # block traces: one per parameter tensor, against the exact diagonal blocks
    start, errors = 0, []
    for block, size in zip(estimate.block_traces, sizes):
        exact = H[start:start + size, start:start + size].trace().item()
        block_var = 2 * sum((H[i, j] ** 2).item() for i in range(start, start + size)
                            for j in range(H.shape[0]) if j != i)
        assert abs(block - exact) < 4 * math.sqrt(block_var / probes) + 1e-6
        # the exact variance of one block sample: 4 H_jk^2 per pair inside the block, H_jk^2 across
        inside = H[start:start + size, start:start + size]
        across = (H[start:start + size] ** 2).sum() - (inside**2).sum()
        exact_var = 2 * ((inside**2).sum() - (inside.diagonal() ** 2).sum()) + across
        standard_error = estimate.block_std_errors[len(errors)]
        errors.append((standard_error, math.sqrt(exact_var.item() / probes)))
        start += size
    for measured, exact in errors:
        assert measured == pytest.approx(exact, rel=0.15, abs=1e-9)
    assert sum(estimate.block_traces) == pytest.approx(estimate.trace, rel=1e-6)


def test_a_diagonal_hessian_is_exact_with_one_probe_and_intermediate_tensors_work():
    torch.manual_seed(1)
    w = torch.randn(5, 3, requires_grad=True)
    h = torch.randn(8, 3) @ w.T          # an intermediate tensor, as EWGS uses
    loss = (h**3).sum() / 6              # d2/dh2 = h on the diagonal, 0 elsewhere
    estimate = hutchinson_trace(loss, [h], max_probes=1)
    assert estimate.trace == pytest.approx(h.sum().item(), rel=1e-5, abs=1e-5)
    assert math.isnan(estimate.block_std_errors[0])  # one probe: no spread to measure
    exact = hutchinson_trace(loss, [h], max_probes=4, tol=0.0)
    assert exact.block_std_errors[0] < 1e-5 * abs(exact.trace)  # a diagonal H: every probe agrees


def test_stopping_rule_and_linear_losses():
    model, x, y = small_problem()
    loss = ((model(x) - y) ** 2).mean()
    loose = hutchinson_trace(loss, list(model.parameters()), max_probes=500, tol=0.5,
                             generator=torch.Generator().manual_seed(0))
    assert loose.converged and 2 <= loose.probes < 500
    assert len(loose.history) == loose.probes and loose.history[-1] == loose.trace
    p = torch.randn(4, requires_grad=True)
    linear = hutchinson_trace((p * 3).sum(), [p], max_probes=3, tol=0.0)
    assert linear.trace == 0.0 and linear.block_traces == [0.0]


def test_rademacher_and_bad_input():
    v = rademacher_like(torch.empty(1000), torch.Generator().manual_seed(0))
    assert set(v.unique().tolist()) == {-1.0, 1.0} and abs(v.mean().item()) < 0.1
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match="loss must be a scalar"):
        hutchinson_trace(p * 2, [p])
    with pytest.raises(ValueError, match="loss does not require grad"):
        hutchinson_trace(torch.tensor(1.0), [p])
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a torch.Tensor that requires grad"):
        hutchinson_trace((p**2).sum(), [torch.ones(3)])
    with pytest.raises(ValueError, match="inputs must hold at least one tensor"):
        hutchinson_trace((p**2).sum(), [])
    with pytest.raises(ValueError, match="max_probes must be"):
        hutchinson_trace((p**2).sum(), [p], max_probes=0)
    with pytest.raises(ValueError, match="vectors\\[0\\] has shape"):
        hessian_vector_product(gradient_graph((p**2).sum(), [p]), [p], [torch.ones(2)])
