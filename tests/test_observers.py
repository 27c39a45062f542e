"""Observers: the ranges they propose, state handling, hooks, and bad input."""

import numpy as np
import pytest
import torch
from torch import nn

from qlib import observers as ob
from qlib.affine import fake_quantize, qparams_from_range, quantization_mse


def batches(seed=0, n=5, size=1000):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g) * (i + 1) for i in range(n)]


def test_minmax_tracks_global_extremes():
    obs = ob.MinMaxObserver()
    data = batches()
    for x in data:
        assert obs(x) is x  # observers pass tensors through unchanged
    lo, hi = obs.clip_range()
    assert lo == pytest.approx(min(x.min().item() for x in data))
    assert hi == pytest.approx(max(x.max().item() for x in data))


def test_minmax_per_channel():
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.2, -7.0]])
    obs = ob.MinMaxObserver(axis=0)
    obs(x)
    lo, hi = obs.clip_range()
    assert lo.tolist() == [-2.0, -7.0] and hi.tolist() == [3.0, 0.5]
    qp = obs.qparams(8, "symmetric", True)
    assert qp.axis == 0 and qp.scale.shape == (2,)


def test_moving_average_formula():
    data = batches()
    obs = ob.MovingAverageObserver(decay=0.8)
    for x in data:
        obs(x)
    lo, hi = data[0].min().item(), data[0].max().item()
    for x in data[1:]:
        lo = 0.8 * lo + 0.2 * x.min().item()
        hi = 0.8 * hi + 0.2 * x.max().item()
    assert obs.clip_range()[0] == pytest.approx(lo, rel=1e-5)
    assert obs.clip_range()[1] == pytest.approx(hi, rel=1e-5)


def test_moving_average_state_dict_roundtrip_per_channel():
    obs = ob.MovingAverageObserver(axis=1)
    obs(torch.randn(4, 3, 5))
    fresh = ob.MovingAverageObserver(axis=1)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.min_val, obs.min_val) and fresh.min_val.shape == (3,)


def test_percentile_exact_when_everything_fits():
    x = torch.arange(10001, dtype=torch.float32)
    obs = ob.PercentileObserver(99.0, max_samples=20000)
    obs(x)
    lo, hi = obs.clip_range()
    assert lo == pytest.approx(100.0) and hi == pytest.approx(9900.0)


def test_reservoir_is_a_uniform_sample():
    obs = ob.PercentileObserver(90.0, max_samples=2000, seed=3)
    for start in range(0, 100_000, 10_000):  # values arrive in increasing order
        obs(torch.arange(start, start + 10_000, dtype=torch.float32))
    sample = obs.samples
    assert sample.size == 2000 and obs.count == 100_000 and obs.seen
    # A uniform sample of 0..99999 has mean ~50000 (std of the mean ~ 650) and covers all batches.
    assert abs(sample.mean() - 50_000) < 3_000
    assert len(np.unique(sample // 10_000)) == 10


def test_mse_observer_finds_the_best_clipping_on_its_grid():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    obs = ob.MSEObserver(num_candidates=50)
    obs(x)
    alphas, errors = obs.search(4, "symmetric", True)
    best = obs.clip_range(4, "symmetric", True)
    amax = max(-x.min().item(), x.max().item())
    # the chosen range is the argmin of the reported curve ...
    assert best[1] == pytest.approx(alphas[np.argmin(errors)] * x.max().item())
    # ... it clips a heavy-tailed distribution at 4 bits, and beats min-max
    assert best[1] < 0.8 * x.max().item()
    qp_best, qp_minmax = obs.qparams(4, "symmetric", True), qparams_from_range(-amax, amax, 4, "symmetric", True)
    assert quantization_mse(x, qp_best) < quantization_mse(x, qp_minmax)
    # with many bits clipping does not pay: the range stays near the full range
    assert obs.clip_range(12, "symmetric", True)[1] > 0.9 * x.max().item()


def test_capture_calibrate_and_fake_quantize_outputs():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(16, 4)
    out = ob.capture_outputs(model, ["1"], x)["1"]
    assert torch.equal(out, torch.relu(model[0](x)))
    obs = ob.calibrate_observers(model, ["1"], [(x, None)], ob.MinMaxObserver)
    qp = obs["1"].qparams(3)
    with ob.fake_quantize_outputs(model, {"1": qp}):
        quantized = model(x)
    assert torch.allclose(quantized, model[2](fake_quantize(out, qp)))
    assert torch.equal(model(x), model[2](out))  # hooks removed after the block
    with ob.fake_quantize_outputs(model, {"1": ob.dynamic_qparams(3)}):
        dynamic = model(x)
    assert torch.allclose(dynamic, quantized)  # the calibration data was this very batch


def test_per_example_dynamic_ranges_equal_running_examples_one_by_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)).eval()
    x = torch.randn(9, 1, 8) * torch.logspace(-2, 1, 9).reshape(-1, 1, 1)  # very different ranges
    x[4] = -1.0  # an example whose ReLU output is all zeros
    with ob.fake_quantize_outputs(model, {"1": ob.dynamic_qparams(3)}):
        one_by_one = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        per_tensor = model(x)
    with ob.fake_quantize_outputs(model, {"1": ob.dynamic_qparams(3, per_example=True)}):
        batched = model(x)
    assert torch.allclose(batched, one_by_one, atol=1e-6)
    assert not torch.allclose(per_tensor, one_by_one, atol=1e-3)  # one range for the batch differs
    with pytest.raises(TypeError, match="per_example"):
        ob.dynamic_qparams(3, per_example=1)


def test_fake_quantize_weights_per_channel_and_per_tensor():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 10.0, 100.0]).reshape(3, 1, 1, 1))
    per_tensor = ob.fake_quantize_weights(model, 4, "per-tensor")
    per_channel = ob.fake_quantize_weights(model, 4, "per-channel")
    w = model[0].weight
    err_t = (per_tensor[0].weight - w).pow(2).sum().item()
    err_c = (per_channel[0].weight - w).pow(2).sum().item()
    assert err_c < err_t
    # the small channel is wiped out by the per-tensor grid (its weights fit inside half a step)
    assert torch.count_nonzero(per_tensor[0].weight[0]) < torch.count_nonzero(per_channel[0].weight[0])
    assert torch.equal(model[0].weight, w)  # the original model is untouched
    # each channel of the per-channel version has at most 2^4 distinct values
    assert all(len(torch.unique(per_channel[0].weight[c])) <= 16 for c in range(3))


def test_bad_input():
    with pytest.raises(ValueError, match="MinMaxObserver has seen no data"):
        ob.MinMaxObserver().qparams()
    with pytest.raises(ValueError, match="MSEObserver has seen no data"):
        ob.MSEObserver().clip_range()
    with pytest.raises(ValueError, match="decay must be < 1.0"):
        ob.MovingAverageObserver(decay=1.0)
    with pytest.raises(ValueError, match="percentile must be > 50.0"):
        ob.PercentileObserver(10)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        ob.MinMaxObserver()(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="x is empty"):
        ob.MinMaxObserver()(torch.zeros(0))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        ob.PercentileObserver()(torch.arange(3))
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model has no submodule named \\['relu'\\]"):
        ob.capture_outputs(model, ["relu"], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="granularity must be one of"):
        ob.fake_quantize_weights(model, 4, "per-row")
    with pytest.raises(TypeError, match="qparams\\['0'\\] must be QuantParams or a callable"):
        with ob.fake_quantize_outputs(model, {"0": 0.5}):
            pass
    with pytest.raises(ValueError, match="batches was empty"):
        ob.calibrate_observers(model, ["0"], [], ob.MinMaxObserver)
    with pytest.raises(ValueError, match="axis must be None or in"):
        ob.MinMaxObserver(axis=3)(torch.zeros(2, 2))


def test_observe_outputs_feeds_each_named_output_and_removes_its_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(16, 4)
    watched = {"0": ob.MinMaxObserver(), "2": ob.MinMaxObserver()}
    with ob.observe_outputs(model, watched) as observers:
        assert observers is watched
        model(x)
    hidden = model[0](x)
    assert watched["0"].min_val.item() == pytest.approx(hidden.min().item())
    assert watched["0"].max_val.item() == pytest.approx(hidden.max().item())
    assert watched["2"].max_val.item() == pytest.approx(model(x).max().item())
    model(10 * x)  # after the block nothing is observed any more
    assert watched["0"].max_val.item() == pytest.approx(hidden.max().item())
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):  # hooks are removed when the block fails, too
        with ob.observe_outputs(model, {"1": ob.MinMaxObserver()}):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="nope"):
        with ob.observe_outputs(model, {"nope": ob.MinMaxObserver()}):
            pass


def test_capture_inputs_returns_what_each_layer_receives():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    x = torch.randn(5, 4)
    seen = ob.capture_inputs(model, ["0", "2"], x)
    assert torch.equal(seen["0"], x)
    assert torch.equal(seen["2"], torch.relu(model[0](x)).detach())
    assert model.training                                        # the mode it was in
    with pytest.raises(ValueError, match="no submodule named"):
        ob.capture_inputs(model, ["9"], x)

    class OneBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="never called"):
        ob.capture_inputs(OneBranch(), ["unused"], x)
