"""Training, evaluation, seeding, checkpoints and the cache of trained networks."""

import math

import pytest
import torch
from torch import nn

from qlib import data, models, train

FAST = train.TrainConfig(epochs=6, batch_size=32, lr=1e-2)


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def small_cnn():
    return models.MnistCNN(widths=(8, 16))


def test_accuracy_and_mean_std():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert train.accuracy(logits, torch.tensor([0, 1, 1, 1])) == 75.0
    assert train.mean_std([1.0, 2.0, 3.0]) == "2.0 ± 1.0"
    assert train.mean_std([5.0], 2) == "5.00 ± 0.00"


@pytest.mark.slow  # trains a network
def test_training_learns_and_is_repeatable(digits):
    train.seed_everything(0)
    model_a = small_cnn()
    before = train.evaluate(model_a, digits)
    history = train.train(model_a, digits, FAST, seed=0, progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_acc"] > max(before, 50.0)
    batches = math.ceil(len(digits.x_train) / FAST.batch_size)
    for record in history:   # the epoch's loss is the batch losses weighted by batch size
        sizes = [FAST.batch_size] * (batches - 1) + [len(digits.x_train) - FAST.batch_size * (batches - 1)]
        assert len(record["step_losses"]) == batches
        assert record["loss"] == pytest.approx(sum(l * n for l, n in zip(record["step_losses"], sizes)) / sum(sizes))
    train.seed_everything(0)
    model_b = small_cnn()
    train.train(model_b, digits, FAST, seed=0, progress=False)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_roundtrip(tmp_path, digits):
    model = small_cnn()
    path = train.save_checkpoint(tmp_path / "m.pt", model, test_acc=12.5, note="x")
    fresh = small_cnn()
    meta = train.load_checkpoint(path, fresh)
    assert meta == {"test_acc": 12.5, "note": "x"}
    for p, q in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(p, q)


def test_checkpoint_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a qlib checkpoint"):
        train.load_checkpoint(tmp_path / "other.pt", small_cnn())
    # weights_only=True: a pickle that would run code is refused
    torch.save({"format": 1, "state_dict": {}, "meta": {"f": print}}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        train.load_checkpoint(tmp_path / "evil.pt", small_cnn())


def test_pretrained_trains_once_then_loads(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("QLIB_CACHE_DIR", str(tmp_path))
    config = train.TrainConfig(epochs=1)
    net, meta = train.pretrained("mnist_cnn", 0, data=digits, config=config, model_kwargs={"widths": [8, 16]},
                                 progress=False)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached network was trained again")

    monkeypatch.setattr(train, "train", no_training)
    again, meta2 = train.pretrained("mnist_cnn", 0, data=digits, config=config, model_kwargs={"widths": [8, 16]})
    assert meta2["key"] == meta["key"] and meta2["test_acc"] == meta["test_acc"]
    for p, q in zip(net.parameters(), again.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(AssertionError, match="trained again"):  # another seed is another key
        train.pretrained("mnist_cnn", 1, data=digits, config=config, model_kwargs={"widths": [8, 16]})


def test_bad_input(digits):
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train.TrainConfig(optimizer="lbfgs")
    with pytest.raises(TypeError, match="data must be a qlib.data.Dataset"):
        train.train(small_cnn(), [1, 2], FAST)
    with pytest.raises(ValueError, match="split must be one of"):
        train.evaluate(small_cnn(), digits, split="valid")
    with pytest.raises(ValueError, match="model must be one of"):
        train.pretrained("alexnet")
    with pytest.raises(ValueError, match="values is empty"):
        train.mean_std([])
    with pytest.raises(ValueError, match="seed must be >= 0"):
        train.seed_everything(-1)


def test_divergence_is_reported(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training diverged"):
        train.train(model, digits, FAST, progress=False)


def test_on_epoch_start_runs_before_each_epoch(digits):
    calls = []
    model = small_cnn()
    train.train(model, digits, train.TrainConfig(epochs=2, batch_size=256), progress=False,
                on_epoch_start=lambda epoch, m: calls.append((epoch, m is model)))
    assert calls == [(1, True), (2, True)]


def test_predict_equals_one_pass_in_eval_mode_and_restores_the_mode(digits):
    torch.manual_seed(0)
    # batch norm makes train and eval mode differ, so a forgotten model.eval() would show
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(digits.input_shape), 16), nn.BatchNorm1d(16),
                          nn.ReLU(), nn.Linear(16, digits.num_classes))
    model.train()
    x = digits.x_test[:37]
    logits = train.predict(model, x, batch_size=10)  # batches of 10, 10, 10, 7
    assert model.training  # the caller's mode is back
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert logits.shape == (37, digits.num_classes) and not logits.requires_grad


def test_make_optimizer_follows_the_config():
    model = nn.Linear(3, 2)
    adam = train.make_optimizer(model, train.TrainConfig(lr=0.01, weight_decay=0.5))
    assert isinstance(adam, torch.optim.AdamW)
    assert adam.defaults["lr"] == 0.01 and adam.defaults["weight_decay"] == 0.5
    sgd = train.make_optimizer(model, train.TrainConfig(optimizer="sgd", lr=0.1, weight_decay=5e-4))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.1
    assert [p for g in sgd.param_groups for p in g["params"]] == list(model.parameters())


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QLIB_CACHE_DIR", str(tmp_path / "c"))
    assert train.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QLIB_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert train.cache_dir() == tmp_path / ".cache" / "qlib"


def test_recipes_name_known_data_and_valid_configs():
    assert set(train.RECIPES) == set(models.MODELS)
    for recipe in train.RECIPES.values():
        assert isinstance(recipe, train.Recipe) and isinstance(recipe.config, train.TrainConfig)
        assert recipe.data in ("mnist5k", "mnist1d", "cifar10")


def test_predict_and_make_optimizer_bad_input():
    with pytest.raises(ValueError, match="batch_size must be"):
        train.predict(nn.Linear(2, 2), torch.zeros(3, 2), batch_size=0)
    with pytest.raises(TypeError, match="x must be a torch tensor"):
        train.predict(nn.Linear(2, 2), [[0.0, 1.0]])
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train.make_optimizer(nn.Linear(2, 2), {"lr": 0.1})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        train.make_optimizer("model", train.TrainConfig())


def test_step_callback_counts_steps_and_the_epoch_evaluation_is_pluggable(digits):
    model = small_cnn()
    steps = []
    history = train.train(model, digits, FAST, progress=False, on_step_start=lambda s, m: steps.append(s),
                          evaluate_epoch=lambda m: {"custom": 1.0})
    per_epoch = math.ceil(len(digits.x_train) / FAST.batch_size)
    assert steps == list(range(FAST.epochs * per_epoch))
    assert all(r["custom"] == 1.0 and "val_acc" not in r for r in history)


def test_correct_marks_each_example():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    y = torch.tensor([0, 0, 0])
    ds = data.Dataset("toy", x, y, x, y, ("a", "b"), x_val=x[:1], y_val=y[:1])
    assert train.correct(model, ds).tolist() == [True, False, True]
    assert train.evaluate(model, ds, "val") == 100.0
