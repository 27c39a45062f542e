"""The experiment harness: runs, the result cache, the final-configuration learning curve, comparisons."""

import numpy as np
import pytest
import torch
from torch import nn

from qlib import experiments, models, ptq, qat, train
from qlib.data import load_digits
from qlib.experiments import QATRecipe, Run, cached_run, execute, grid, run_grid, trained_model

FAST = QATRecipe(epochs=2, lr=1e-2, batch_size=128, calibration_images=200)


class Tiny(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(models.conv_bn_relu(1, width, 3), models.conv_bn_relu(width, width, 3, 2))
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(width * 16, 10)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


@pytest.fixture()
def tiny(monkeypatch, tmp_path):
    """A registered tiny network on scikit-learn's digits, with a private cache."""
    monkeypatch.setitem(models.MODELS, "tiny", Tiny)
    monkeypatch.setitem(train.RECIPES, "tiny", train.Recipe("digits", train.TrainConfig(epochs=3, lr=1e-2)))
    monkeypatch.setenv("QLIB_CACHE_DIR", str(tmp_path))
    return load_digits()


@pytest.mark.slow  # trains networks
def test_a_run_measures_what_it_says(tiny):
    run = Run("tiny", "lsq", "lsq", bits=3, seed=0, recipe=FAST)
    result, model = execute(run, tiny)
    assert result["float_val"] == pytest.approx(train.evaluate(train.pretrained("tiny", 0, data=tiny)[0], tiny, "val"))
    assert len(result["history"]) == 2 and all(0 <= h["val_acc"] <= 100 for h in result["history"])
    assert result["test"] == pytest.approx(100 * float(result["test_correct"].float().mean()))
    assert result["val"] == pytest.approx(result["history"][-1]["val_acc"])   # the curve ends where the run does
    assert result["test"] == pytest.approx(train.evaluate(model, tiny)) and result["seconds"] > 0
    ptq = execute(Run("tiny", "lsq", "lsq", bits=3, seed=0, recipe=FAST, ptq=True), tiny)[0]
    assert ptq["history"] == [] and ptq["test"] == pytest.approx(ptq["start_test"]) == pytest.approx(
        result["start_test"])


@pytest.mark.slow  # trains networks
def test_the_cache_serves_a_run_once_and_keys_everything_but_the_label(tiny, monkeypatch):
    run = Run("tiny", "lsq", bits=3, recipe=FAST, label="first")
    first = cached_run(run, tiny)
    monkeypatch.setattr(experiments, "execute", lambda *a, **k: pytest.fail("ran again instead of the cache"))
    again = cached_run(Run("tiny", "lsq", bits=3, recipe=FAST, label="another name"), tiny)
    assert again["test"] == first["test"] and torch.equal(again["test_correct"], first["test_correct"])
    assert Run("tiny", "lsq", bits=3, recipe=FAST.replace(lr=2e-2)).key() != run.key()
    assert Run("tiny", "lsq", bits=3, recipe=FAST, seed=1).key() != run.key()
    original = run.key()
    assert Run("tiny", "lsq", bits=3, recipe=FAST).key() == original
    monkeypatch.setattr(experiments, "code_fingerprint", lambda: "other code")
    assert Run("tiny", "lsq", bits=3, recipe=FAST).key() != original   # changed code, new runs


@pytest.mark.slow  # trains networks
def test_trained_model_is_the_network_the_run_measured(tiny):
    run = Run("tiny", "lsq", bits=3, recipe=FAST)
    result = cached_run(run, tiny)
    model = trained_model(run, tiny)
    assert train.evaluate(model, tiny) == pytest.approx(result["test"])


@pytest.mark.slow  # trains networks
def test_activation_delay_switches_at_its_fraction_and_curves_use_the_final_configuration(tiny, monkeypatch):
    switches = []
    original = qat.set_quantization

    def spy(model, weights=None, activations=None):
        switches.append(activations)
        return original(model, weights, activations)

    monkeypatch.setattr(qat, "set_quantization", spy)
    seen = []
    original_evaluate = experiments.evaluate

    def evaluate(model, data, split="test", batch_size=1000):
        seen.append(all(q.enabled for q in model.modules() if isinstance(q, experiments.Quantizer)))
        return original_evaluate(model, data, split, batch_size)

    monkeypatch.setattr(experiments, "evaluate", evaluate)
    execute(Run("tiny", "lsq", bits=3, recipe=FAST.replace(act_delay=0.5)), tiny)
    assert switches[:2] == [False, True]          # off from step 0, on at half of the steps
    assert all(seen)                               # every evaluation with every quantizer on


@pytest.mark.slow  # trains networks
def test_grid_and_paired_comparison(tiny):
    runs = grid("tiny", {"LSQ": "lsq", "minmax": "minmax"}, [3], seeds=[0, 1], recipe=FAST)
    assert [r.name for r in runs] == ["LSQ", "LSQ", "minmax", "minmax"]
    results = run_grid(runs, tiny, progress=False)
    table = results.table()
    assert list(table.label) == ["LSQ", "LSQ", "minmax", "minmax"] and set(table.seed) == {0, 1}
    comparison = results.compare({"label": "LSQ"}, {"label": "minmax"})
    lsq, minmax = results.correct(label="LSQ"), results.correct(label="minmax")
    assert lsq.shape == (2, len(tiny.y_test))
    assert comparison.difference == pytest.approx(100 * (lsq.mean() - minmax.mean()))
    assert comparison.verdict in experiments.VERDICTS
    with pytest.raises(ValueError, match="no run matches"):
        results.correct(label="DSQ")
    table = results.comparisons([({"label": "LSQ", "bits": 3}, {"label": "minmax"})])
    assert list(table["method"]) == ["LSQ, W3"] and list(table["against"]) == ["minmax"]
    assert table["verdict"][0] == comparison.verdict


def test_comparison_tables_name_each_filter_field():
    describe = experiments._describe_filter
    assert describe({"label": "LSQ", "bits": 2, "act_bits": 4}) == "LSQ, W2, A4"
    assert describe({"seed": 3, "first_last_bits": 8}) == "seed 3, first/last 8 bits"


@pytest.mark.slow  # reconstructs a network
def test_post_training_runs_cache_their_codes_and_reload_them(tiny):
    adaround = ptq.Reconstruction("layer", iterations=15, batch_size=32, lr=1e-2)
    recipes = {"RTN": experiments.PTQRecipe(200), "RTN + bias": experiments.PTQRecipe(200, ("equalize", "bias")),
               "AdaRound": experiments.PTQRecipe(200, reconstruction=adaround)}
    runs = [Run("tiny", "lsq", "lsq+", bits=3, act_bits=4, seed=0, label=k, post_training=r) for k, r in recipes.items()]
    results = run_grid(runs, tiny, progress=False)
    rtn, toolbox, learned = results.results
    assert rtn["val"] == rtn["start_val"] and rtn["test"] == rtn["start_test"] and rtn["seconds"] > 0
    assert toolbox["start_test"] != rtn["start_test"] or toolbox["start_val"] != rtn["start_val"]
    assert learned["start_test"] == rtn["start_test"]  # reconstruction starts from round-to-nearest
    assert {"soft_val", "soft_test"} <= set(learned) and len(learned["ptq_log"]) == 3
    assert all(len(u["undecided"]) == len(u["layers"]) == 1 for u in learned["ptq_log"])
    table = results.table()
    assert list(table.epochs) == [0, 0, 0]
    assert table.soft_test.isna().tolist() == [True, True, False]  # only a reconstruction has soft accuracies
    assert table.soft_test.iloc[2] == learned["soft_test"] and table.soft_val.iloc[2] == learned["soft_val"]
    model = trained_model(runs[2], tiny)
    assert all(q.hard for q in ptq.adaround_quantizers(model).values())
    assert torch.equal(train.correct(model, tiny), learned["test_correct"])  # the codes the run measured


def test_post_training_runs_refuse_other_grids_and_unknown_tools():
    with pytest.raises(ValueError, match="post_training"):
        Run("mnist1d_cnn", "minmax", post_training=experiments.PTQRecipe())
    with pytest.raises(ValueError, match="toolbox"):
        experiments.PTQRecipe(toolbox=("cle",))
    with pytest.raises(TypeError, match="reconstruction"):
        experiments.PTQRecipe(reconstruction={"iterations": 5})


def test_runs_refuse_what_they_cannot_be():
    with pytest.raises(ValueError, match="network must be one of"):
        Run("nope", "lsq")
    with pytest.raises(ValueError, match="method must be a grid"):
        Run("mnist1d_cnn", "lsq+sgd")
    with pytest.raises(ValueError, match="act_delay"):
        QATRecipe(act_delay=1.0)
    with pytest.raises(TypeError, match="recipe must be a QATRecipe"):
        Run("mnist1d_cnn", "lsq", recipe=train.TrainConfig())
    with pytest.raises(TypeError, match="non-empty sequence"):
        run_grid([])


def test_quantizer_parameters_get_their_own_group_without_decay():
    model = qat.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "lsq", "pact", bits=4)
    groups = train.parameter_groups(model, train.TrainConfig(lr=1e-3, quantizer_lr=5e-2, weight_decay=0.1))
    network, quantizers = groups
    assert network["lr"] == 1e-3 and network["weight_decay"] == 0.1
    assert quantizers["lr"] == 5e-2 and quantizers["weight_decay"] == 0.0
    assert len(network["params"]) == 4                       # two weights, two biases
    assert {id(p) for p in quantizers["params"]} == {id(p) for m in model.modules()
                                                    if isinstance(m, experiments.Quantizer) for p in m.parameters()}
    single = train.parameter_groups(nn.Linear(2, 2), train.TrainConfig())
    assert len(single) == 1 and np.isclose(single[0]["lr"], train.TrainConfig().lr)


@pytest.mark.slow  # trains two float networks and two quantized runs, twice
def test_runs_in_worker_processes_give_what_they_give_here(tmp_path, monkeypatch):
    recipe = QATRecipe(epochs=1, batch_size=256, calibration_images=100)
    narrow = {"width": 4}  # the same code paths as the book's network, at a fraction of the cost
    runs = [Run("mnist1d_cnn", "lsq", bits=4, seed=s, recipe=recipe, model_kwargs=tuple(narrow.items()))
            for s in (0, 1)]
    monkeypatch.setenv("QLIB_CACHE_DIR", str(tmp_path / "workers"))
    experiments.pretrain("mnist1d_cnn", [0, 1], model_kwargs=narrow, workers=2)
    assert all(train.pretrained_path("mnist1d_cnn", s, model_kwargs=narrow)[0].exists() for s in (0, 1))
    floats_parallel = [train.pretrained("mnist1d_cnn", s, model_kwargs=narrow)[0].state_dict() for s in (0, 1)]
    parallel = run_grid(runs, progress=False, workers=2)
    monkeypatch.setenv("QLIB_CACHE_DIR", str(tmp_path / "here"))
    here = run_grid(runs, progress=False, workers=1)
    for a, b in zip(parallel.results, here.results):
        assert torch.equal(a["test_correct"], b["test_correct"]) and a["test"] == b["test"]
    for seed, weights in zip((0, 1), floats_parallel):
        mine = train.pretrained("mnist1d_cnn", seed, model_kwargs=narrow)[0].state_dict()
        assert all(torch.equal(weights[k], mine[k]) for k in mine)


def test_pretrain_refuses_unknown_networks_and_empty_lists():
    with pytest.raises(ValueError, match="networks must be names"):
        experiments.pretrain("vgg", [0])
    with pytest.raises(ValueError, match="must not be empty"):
        experiments.pretrain("mnist1d_cnn", [])
    with pytest.raises(ValueError, match="seeds"):
        experiments.pretrain("mnist1d_cnn", [-1])


@pytest.mark.slow  # trains a network
def test_the_float_accuracies_are_evaluated_once_per_network_and_data_set(tiny):
    runs = [Run("tiny", "lsq", "lsq+", bits=b, seed=0, post_training=experiments.PTQRecipe(100)) for b in (3, 4)]
    first, second = (execute(r, tiny)[0] for r in runs)
    network = train.pretrained("tiny", 0, data=tiny)[0]
    assert first["float_test"] == second["float_test"] == train.evaluate(network, tiny)
    assert first["float_val"] == second["float_val"] == train.evaluate(network, tiny, "val")
    entries = [k for k in experiments._FLOAT_ACCURACIES if k[2] == id(tiny)]
    assert len(entries) == 1  # the second run reused the first one's evaluation
    other = load_digits(test_fraction=0.3)  # another data set object: evaluated afresh, on its own split
    third = execute(runs[0], other)[0]
    assert third["float_test"] == train.evaluate(train.pretrained("tiny", 0, data=other)[0], other)


@pytest.mark.slow  # trains networks
def test_a_mixed_precision_run_quantizes_each_layer_at_its_width(tiny):
    # Tiny's inner layer is features.1.0 (the first and last stay at 8 bits)
    mixed = Run("tiny", "lsq", "lsq", bits={"features.1.0": 2}, act_bits=4, recipe=FAST)
    same = Run("tiny", "lsq", "lsq", bits=(("features.1.0", 2),), act_bits=4, recipe=FAST)
    assert mixed == same and mixed.key() == same.key() and mixed.mixed and mixed.bits_name == "W2A4"
    assert mixed.key() != Run("tiny", "lsq", "lsq", bits={"features.1.0": 3}, act_bits=4, recipe=FAST).key()
    _, model, _ = experiments.prepared_model(mixed, tiny)
    layers = dict(qat.quantized_layers(model))
    assert layers["features.1.0"].weight_quantizer.bits == 2 and layers["features.1.0"].input_quantizer.bits == 4
    assert layers["classifier"].weight_quantizer.bits == 8
    # the same network as the uniform run with that width: a mapping is only a way to say it
    uniform = Run("tiny", "lsq", "lsq", bits=2, act_bits=4, recipe=FAST)
    assert cached_run(mixed, tiny)["test"] == pytest.approx(cached_run(uniform, tiny)["test"])
    table = experiments.Results([mixed], [cached_run(mixed, tiny)]).table()
    assert table.loc[0, "bits"] == "W2A4"


def test_mixed_precision_runs_refuse_what_they_cannot_be():
    with pytest.raises(ValueError, match="needs act_bits"):
        Run("mnist1d_cnn", "lsq", bits={"features.1.0": 2})
    with pytest.raises(ValueError, match="non-empty mapping"):
        Run("mnist1d_cnn", "lsq", bits={}, act_bits=4)
    with pytest.raises(ValueError, match=r"bits\['features.1.0'\]"):
        Run("mnist1d_cnn", "lsq", bits={"features.1.0": 1}, act_bits=4)
    with pytest.raises(ValueError, match="one weight width"):
        Run("mnist1d_cnn", "lsq", "lsq+", bits={"features.1.0": 2}, act_bits=4,
            post_training=experiments.PTQRecipe())
