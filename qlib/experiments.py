"""Experiments over seeds: a harness for quantization-aware runs, paired verdicts and summaries
(chapters 5 to 11).

* A :class:`Run` is one configuration (network x methods x bits x seed x :class:`QATRecipe`);
  :func:`run_grid` runs a list of them, each trained once per build and cached with a key that
  covers the whole configuration and qlib's code (:func:`cached_run`), and returns
  :class:`Results`: a tidy table, per-example correctness and paired comparisons.
* :func:`paired_difference` compares two methods over the same seeds and test examples (every
  seed shares its float network, data order and test set), with an interval that carries both the
  seeds' and the test set's noise, and a verdict ("better", "worse", "inconclusive") that a
  chapter's prose is chosen by.
* :func:`summarise` turns a tidy table into the table a chapter shows: mean ± standard deviation
  per group, and the error ratio (quantized error / float error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from . import ptq, qat
from ._checks import check_bits, check_float, check_int
from .data import Dataset, load
from .fold import fold_batchnorm
from .quantizers import EWGSSchedule, Quantizer, ewgs_quantizers, parse_method
from .train import (RECIPES, TrainConfig, cache_dir, code_fingerprint, correct, evaluate, mean_std, pretrained,
                    pretrained_path, single_threaded, train)

__all__ = ["summarise", "error_ratio", "Comparison", "paired_t", "paired_difference", "VERDICTS", "QATRecipe", "Run",
           "Results", "run_grid", "grid", "execute", "cached_run", "trained_model", "prepared_model", "run_path",
           "default_workers", "running_data", "pretrain", "PTQRecipe", "calibration_set"]


def error_ratio(accuracy, reference) -> np.ndarray:
    """``(100 - accuracy) / (100 - reference)``: how many times the float network's error rate (both in %)."""
    accuracy, reference = np.asarray(accuracy, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if (reference >= 100).any():
        raise ValueError("reference accuracy must be below 100 % (an error ratio divides by its error)")
    return (100 - accuracy) / (100 - reference)


def summarise(results, by, columns: dict[str, str], ratio: str | dict[str, str] | None = None,
              reference: str = "float", digits: int = 2):
    """Mean ± std of ``columns`` per group of ``by``, in the groups' order of appearance.

    ``columns`` maps a column of ``results`` to its heading in the summary; ``ratio``, if given, adds
    the error ratio of that column against ``reference`` (per run, then mean ± std), headed "error
    ratio" (or several: ``{column: heading}``). Missing values (a measurement some rows do not have)
    show as "–".
    """
    if not isinstance(results, pd.DataFrame) or results.empty:
        raise ValueError("results must be a non-empty pandas DataFrame")
    by = [by] if isinstance(by, str) else list(by)
    ratios = {} if ratio is None else {ratio: "error ratio"} if isinstance(ratio, str) else dict(ratio)
    measured = list(dict.fromkeys(list(columns) + list(ratios) + ([reference] if ratios else [])))
    missing = [c for c in measured + by if c not in results.columns]
    if missing:
        raise ValueError(f"results has no column {missing}; it has {list(results.columns)}")
    digits = check_int(digits, "digits", 0)

    def one(group):
        row = {heading: mean_std(group[column], digits) if group[column].notna().all() else "–"
               for column, heading in columns.items()}
        for column, heading in ratios.items():
            row[heading] = mean_std(error_ratio(group[column], group[reference]), digits)
        return pd.Series(row)

    return results.groupby(by, sort=False)[measured].apply(one)


# ---------------------------------------------------------------- paired comparisons -----

VERDICTS = ("better", "worse", "inconclusive")


@dataclass(frozen=True)
class Comparison:
    """A method against a baseline over the same seeds and test examples.

    ``difference``: the mean over seeds of (method - baseline) accuracy, in points; ``low`` and
    ``high``: its confidence interval; ``per_seed``: the paired differences; ``verdict``: "better"
    when the whole interval is above 0, "worse" when it is below, "inconclusive" otherwise.
    """

    difference: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    verdict: str
    method: str = "paired t"
    confidence: float = 0.95

    def describe(self, digits: int = 2) -> str:
        """``"+1.23 points [+0.45, +2.01]"``: the difference with its interval."""
        return f"{self.difference:+.{digits}f} points [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def choose(self, better: str, worse: str, inconclusive: str) -> str:
        """The sentence for this verdict (``{d}`` in it becomes :meth:`describe`): prose chosen by the
        measurement, never asserted."""
        text = {"better": better, "worse": worse, "inconclusive": inconclusive}[self.verdict]
        return text.replace("{d}", self.describe())


def _verdict(low: float, high: float) -> str:
    return "better" if low > 0 else "worse" if high < 0 else "inconclusive"


def paired_t(method, baseline, confidence: float = 0.95) -> Comparison:
    """Paired per-seed differences with Student's t-interval (seeds are the only source of noise)."""
    a, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"method and baseline need the same >= 2 seeds, got shapes {a.shape} and {b.shape}")
    confidence = check_float(confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
    d = a - b
    half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    mean = float(d.mean())
    return Comparison(mean, mean - half, mean + half, tuple(d.tolist()), _verdict(mean - half, mean + half),
                      "paired t, seeds", confidence)


def paired_difference(method_correct, baseline_correct, confidence: float = 0.95) -> Comparison:
    """Paired difference of two methods' accuracies over the same seeds and test examples.

    ``method_correct`` and ``baseline_correct`` are boolean arrays ``(seeds, examples)``: whether
    each seed's network got each test example right. The difference is the mean of the per-seed
    differences ``d_s``; its standard error adds the two sources of noise a reader should see:
    the training runs (the spread of ``d_s`` over seeds, ``var(d_s) / S``) and the finite test set
    (the variance over examples of the seed-averaged per-example difference, divided by their
    number ``N``; on 1,000 test images this alone is about 0.5-1 point). The interval is
    ``mean +- t_{S-1} SE`` (Student's t with the seeds' degrees of freedom, the conservative choice).
    """
    a = np.asarray(method_correct, dtype=bool)
    b = np.asarray(baseline_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError("method_correct and baseline_correct must be boolean (seeds >= 2, examples >= 2) arrays "
                         f"of one shape, got {a.shape} and {b.shape}")
    confidence = check_float(confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
    seeds, examples = a.shape
    diff = 100 * (a.astype(np.float64) - b.astype(np.float64))     # (seeds, examples), points
    per_seed = diff.mean(axis=1)
    se = np.sqrt(per_seed.var(ddof=1) / seeds + diff.mean(axis=0).var(ddof=1) / examples)
    half = stats.t.ppf(0.5 + confidence / 2, seeds - 1) * se
    mean = float(per_seed.mean())
    return Comparison(mean, mean - half, mean + half, tuple(per_seed.tolist()), _verdict(mean - half, mean + half),
                      "paired t, seeds and test examples", confidence)


# ---------------------------------------------------------------- the harness -----

@dataclass(frozen=True)
class QATRecipe:
    """How a quantization-aware run fine-tunes a trained float network.

    ``epochs`` of Adam(W) (or SGD) with a cosine schedule at ``lr`` for the network's parameters and
    ``quantizer_lr`` for the quantizers' own (``None``: the same), no weight decay on the latter
    (:func:`qlib.train.parameter_groups`). Activation quantizers are off for the first
    ``act_delay`` fraction of the steps (Jacob et al.'s delay; 0 quantizes from the start); with
    batch norm folded in training (``Run.fold_bn``) its statistics freeze after ``freeze_bn`` of the
    steps. EWGS's deltas are re-estimated at the start of every ``ewgs_every``-th epoch from
    ``ewgs_first`` on (the STE before it), on ``ewgs_batches`` batches. The quantizers start from
    ``calibration_images`` training images.
    """

    epochs: int = 8
    lr: float = 1e-3
    quantizer_lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 64
    optimizer: str = "adam"
    act_delay: float = 0.0
    freeze_bn: float = 0.9
    calibration_images: int = 500
    ewgs_first: int = 2
    ewgs_every: int = 2
    ewgs_batches: int = 3
    ewgs_probes: int = 50

    def __post_init__(self):
        self.train_config()   # validates the shared fields
        check_float(self.act_delay, "act_delay", 0.0, 1.0, high_open=True)
        check_float(self.freeze_bn, "freeze_bn", 0.0, 1.0)
        check_int(self.calibration_images, "calibration_images", 1)
        for name in ("ewgs_first", "ewgs_every", "ewgs_batches", "ewgs_probes"):
            check_int(getattr(self, name), name, 1)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, optimizer=self.optimizer, quantizer_lr=self.quantizer_lr)

    def replace(self, **changes) -> QATRecipe:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PTQRecipe:
    """How a post-training run quantizes a trained float network without training it (chapter 9):
    ``calibration_images`` training examples (the same for every method and seed), the toolbox
    steps in this order (``"equalize"``: cross-layer equalization before quantizing, ``"bias"``: bias
    correction after), then an optional :class:`qlib.ptq.Reconstruction` (AdaRound, BRECQ, QDrop).
    The grids are :func:`qlib.ptq.round_to_nearest`'s (LSQ weights and LSQ+ activations at their
    least-squared-error ranges), so a run with a ``PTQRecipe`` names ``weight="lsq"``, ``act="lsq+"``."""

    calibration_images: int = 1024
    toolbox: tuple = ()
    reconstruction: ptq.Reconstruction | None = None

    TOOLS = ("equalize", "bias")

    def __post_init__(self):
        check_int(self.calibration_images, "calibration_images", 1)
        if not isinstance(self.toolbox, tuple) or any(t not in self.TOOLS for t in self.toolbox):
            raise ValueError(f"toolbox must be a tuple of {self.TOOLS}, got {self.toolbox!r}")
        if self.reconstruction is not None and not isinstance(self.reconstruction, ptq.Reconstruction):
            raise TypeError(f"reconstruction must be a qlib.ptq.Reconstruction or None, got "
                            f"{type(self.reconstruction).__name__}")


@dataclass(frozen=True)
class Run:
    """One quantization-aware training run: network, methods, bits, seed and recipe.

    ``weight`` and ``act`` are method names of :mod:`qlib.quantizers.registry` (``act`` defaults to
    ``weight``); ``epochs=0`` in the recipe is not allowed, but ``ptq=True`` stops after calibration
    (post-training quantization with the same grids), and ``post_training`` (a :class:`PTQRecipe`)
    runs chapter 9's post-training pipeline instead of training. ``model_kwargs`` (pairs) change the network
    (e.g. its widths); ``label`` names the run in tables and is not part of its identity.

    ``bits`` is one weight width for every inner layer or, for mixed precision (chapter 10), a
    mapping from each inner layer's name to its width (:func:`qlib.qat.prepare`); it is kept as
    sorted ``(name, bits)`` pairs, so the same allocation is the same run however it was written.
    """

    network: str
    weight: str
    act: str | None = None
    bits: int | tuple = 4
    act_bits: int | None = None
    seed: int = 0
    recipe: QATRecipe = QATRecipe()
    first_last_bits: int | None = 8
    per_channel: bool = True
    fold_bn: bool = False
    ptq: bool = False
    model_kwargs: tuple = ()
    label: str = ""
    post_training: PTQRecipe | None = None

    def __post_init__(self):
        if self.network not in RECIPES:
            raise ValueError(f"network must be one of {sorted(RECIPES)}, got {self.network!r}")
        parse_method(self.weight)
        parse_method(self.act or self.weight)
        if isinstance(self.bits, (Mapping, tuple)):
            pairs = tuple(sorted(dict(self.bits).items()))
            if not pairs or not all(isinstance(n, str) for n, _ in pairs):
                raise ValueError(f"bits must be an int or a non-empty mapping from layer names to widths, "
                                 f"got {self.bits!r}")
            for n, b in pairs:
                check_bits(b, f"bits[{n!r}]")
            object.__setattr__(self, "bits", pairs)
            if self.act_bits is None:
                raise ValueError("a mixed-precision run (bits a mapping) needs act_bits")
        else:
            check_bits(self.bits)
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        check_int(self.seed, "seed", 0)
        if not isinstance(self.recipe, QATRecipe):
            raise TypeError(f"recipe must be a QATRecipe, got {type(self.recipe).__name__}")
        if self.post_training is not None:
            if not isinstance(self.post_training, PTQRecipe):
                raise TypeError(f"post_training must be a PTQRecipe, got {type(self.post_training).__name__}")
            if self.mixed:
                raise ValueError("a post_training run takes one weight width (bits an int), not a mapping")
            if (self.weight, self.act, self.ptq, self.fold_bn) != ("lsq", "lsq+", False, False):
                raise ValueError("a post_training run uses qlib.ptq's grids: weight='lsq', act='lsq+', "
                                 "ptq=False, fold_bn=False")

    @property
    def mixed(self) -> bool:
        """Whether the inner layers' weight widths are given per layer."""
        return isinstance(self.bits, tuple)

    @property
    def weight_bits(self) -> int | dict:
        """The weight width for :func:`qlib.qat.prepare`: an int, or a dict per layer."""
        return dict(self.bits) if self.mixed else self.bits

    @property
    def bits_name(self) -> str:
        """``W2A4``; mixed precision names the widths it uses, ``W2/3/8A4``."""
        weights = "/".join(map(str, sorted(set(dict(self.bits).values())))) if self.mixed else self.bits
        return f"W{weights}A{self.act_bits or self.bits}"

    @property
    def name(self) -> str:
        """The label, or a name made from the methods and bits."""
        methods = self.weight if (self.act or self.weight) == self.weight else f"{self.weight}/{self.act}"
        return self.label or f"{methods} {self.bits_name}"

    def spec(self) -> dict:
        """Everything the result depends on (the cache key), the label excepted."""
        spec = dataclasses.asdict(self)
        spec.pop("label")
        spec["act"] = self.act or self.weight
        spec["model_kwargs"] = [list(kv) for kv in self.model_kwargs]
        return spec

    def key(self) -> str:
        spec = {"run": self.spec(), "code": code_fingerprint(), "torch": torch.__version__.split("+")[0]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _quantized_eval(model: nn.Module):
    """A context in which every quantizer of ``model`` is on (the final configuration)."""
    from contextlib import contextmanager

    @contextmanager
    def context():
        quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
        states = [q.enabled for q in quantizers]
        for q in quantizers:
            q.enabled = True
        try:
            yield
        finally:
            for q, state in zip(quantizers, states):
                q.enabled = state

    return context()


_DATASETS: dict[str, Dataset] = {}


def running_data(network: str) -> Dataset:
    """The data set a running-example network trains on, loaded once per process."""
    name = RECIPES[network].data
    if name not in _DATASETS:
        _DATASETS[name] = load(name)
    return _DATASETS[name]


def calibration_set(dataset: Dataset, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: the first ``images`` examples of the seeded calibration shuffle of the training split
    (:meth:`qlib.data.Dataset.calibration_batches`), in one tensor each."""
    pairs = dataset.calibration_batches(images, labels=True)
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def prepared_model(run: Run, dataset: Dataset | None = None) -> tuple[nn.Module, nn.Module, Dataset]:
    """``(float model, prepared and calibrated model, data)`` of a run, before any training (for a
    post-training run: after its toolbox, before reconstruction)."""
    dataset = dataset if dataset is not None else running_data(run.network)
    float_model, _ = pretrained(run.network, run.seed, data=dataset, model_kwargs=dict(run.model_kwargs),
                                progress=False)
    if run.post_training is not None:
        recipe = run.post_training
        x, _ = calibration_set(dataset, recipe.calibration_images)
        base = ptq.equalize(float_model) if "equalize" in recipe.toolbox else float_model
        quantized = ptq.round_to_nearest(base, [x], run.bits, run.act_bits, run.first_last_bits, run.per_channel)
        if "bias" in recipe.toolbox:
            ptq.correct_bias(quantized, [x])
        return float_model, quantized, dataset
    prepared = qat.prepare(float_model, run.weight, run.act or run.weight, bits=run.weight_bits, act_bits=run.act_bits,
                           first_last_bits=run.first_last_bits, per_channel=run.per_channel,
                           example_input=dataset.x_train[:64], fold_bn=run.fold_bn)
    qat.calibrate_quantizers(prepared, dataset.calibration_batches(run.recipe.calibration_images))
    return float_model, prepared, dataset


def execute(run: Run, dataset: Dataset | None = None, device: str = "cpu", progress: bool | None = False
            ) -> tuple[dict, nn.Module]:
    """Run one configuration (no cache): ``(result, trained model)``.

    The result holds the float network's and the calibrated start's accuracies (``float_val``,
    ``float_test``, ``start_val``, ``start_test``), the history per epoch (training loss, validation
    accuracy under the final quantization configuration), the final ``val`` and ``test`` accuracies,
    ``test_correct`` and ``val_correct`` (per example, for paired comparisons), the training time in
    seconds (a post-training run: calibration, toolbox and reconstruction, with ``soft_val``,
    ``soft_test`` and the per-unit ``ptq_log``) and, for EWGS, its log. Everything runs on one CPU thread (:func:`qlib.train.single_threaded`):
    calibration, training and evaluation give the same numbers wherever the run executes.
    """
    with single_threaded():
        return _execute(run, dataset, device, progress)


def _execute(run, dataset, device, progress):
    recipe = run.recipe
    start = time.perf_counter()
    float_model, model, dataset = prepared_model(run, dataset)
    prepare_seconds = time.perf_counter() - start  # a post-training run's calibration and toolbox
    start_correct = {split: correct(model, dataset, split) for split in ("val", "test")}
    float_val, float_test = _float_accuracies(run, float_model, dataset)
    result = {"run": run.spec(), "label": run.name, "float_val": float_val, "float_test": float_test,
              "start_val": _percent(start_correct["val"]), "start_test": _percent(start_correct["test"])}
    history, seconds, log = [], 0.0, []
    if run.post_training is not None:
        seconds, ptq_log, soft = _reconstruct(run, float_model, model, dataset)
        seconds += prepare_seconds
        result.update(soft, ptq_log=ptq_log)
    elif not run.ptq:
        config = recipe.train_config()
        total = config.epochs * math.ceil(len(dataset.x_train) / config.batch_size)
        delay, freeze = int(recipe.act_delay * total), int(recipe.freeze_bn * total)
        schedule = None
        if ewgs_quantizers(model):
            schedule = EWGSSchedule(dataset, every=recipe.ewgs_every, first=recipe.ewgs_first,
                                    num_batches=recipe.ewgs_batches, max_probes=recipe.ewgs_probes, seed=run.seed)

        def on_step_start(step, m):
            if step == 0 or step == delay:
                qat.set_quantization(m, activations=step >= delay)
            if run.fold_bn and step == freeze:
                qat.freeze_batchnorm_statistics(m)

        def on_epoch_start(epoch, m):
            if schedule is not None:
                schedule(epoch, m)

        def evaluate_epoch(m):
            with _quantized_eval(m):
                return {"val_acc": evaluate(m, dataset, "val")}

        start = time.perf_counter()
        history = train(model, dataset, config, seed=run.seed, progress=progress, desc=run.name, device=device,
                        on_epoch_start=on_epoch_start, on_step_start=on_step_start, evaluate_epoch=evaluate_epoch)
        seconds = time.perf_counter() - start
        qat.set_quantization(model, activations=True)
        if schedule is not None:
            schedule.close(model)
            log = schedule.log
        model.cpu()
    unchanged = run.ptq or (run.post_training is not None and run.post_training.reconstruction is None)
    final = start_correct if unchanged else {split: correct(model, dataset, split) for split in ("val", "test")}
    result.update({
        "history": [{"epoch": h["epoch"], "loss": h["loss"], "val_acc": h["val_acc"],
                     "step_losses": h["step_losses"]} for h in history],
        "val": _percent(final["val"]), "test": _percent(final["test"]),
        "val_correct": final["val"], "test_correct": final["test"], "seconds": seconds, "ewgs_log": log})
    return result, model


_FLOAT_ACCURACIES: dict = {}


def _float_accuracies(run, float_model, dataset) -> tuple[float, float]:
    """The float network's validation and test accuracy, evaluated once per process for every run
    that starts from the same cached network and data set (a grid evaluates each many times)."""
    path = pretrained_path(run.network, run.seed, model_kwargs=dict(run.model_kwargs), data_name=dataset.name)[0]
    key = (str(path), path.stat().st_mtime_ns if path.exists() else None, id(dataset))
    if key[1] is None or key not in _FLOAT_ACCURACIES:
        accuracies = (evaluate(float_model, dataset, "val"), evaluate(float_model, dataset))
        if key[1] is None:
            return accuracies
        _FLOAT_ACCURACIES[key] = (dataset, accuracies)  # the data set kept alive: its id stays unique
    return _FLOAT_ACCURACIES[key][1]


def _reconstruct(run, float_model, model, dataset):
    """A post-training run's reconstruction, in place: ``(seconds, log, soft accuracies)``."""
    recipe = run.post_training
    if recipe.reconstruction is None:
        return 0.0, [], {}
    start = time.perf_counter()
    x, y = calibration_set(dataset, recipe.calibration_images)
    reference = ptq.equalize(float_model) if "equalize" in recipe.toolbox else fold_batchnorm(float_model)
    units = ptq.reconstruct(model, reference, x, recipe.reconstruction, labels=y, seed=run.seed)["units"]
    seconds = time.perf_counter() - start
    with ptq.soft_rounding(model):
        soft = {"soft_val": evaluate(model, dataset, "val"), "soft_test": evaluate(model, dataset)}
    log = [{k: u[k] for k in ("unit", "layers", "undecided", "rounded_away", "seconds")} |
           {"loss": u["loss"][:: max(1, len(u["loss"]) // 100)]} for u in units]
    return seconds, log, soft


def _percent(correct_examples: torch.Tensor) -> float:
    return 100.0 * float(correct_examples.double().mean())


_FILTER_LABELS = {"bits": "W{}", "act_bits": "A{}", "seed": "seed {}", "first_last_bits": "first/last {} bits"}


def _describe_filter(filters: dict) -> str:
    """A filter as a table cell: ``{"label": "LSQ", "bits": 2, "act_bits": 4}`` -> ``LSQ, W2, A4``."""
    return ", ".join(_FILTER_LABELS.get(k, "{}").format(v) for k, v in filters.items())


def run_path(run: Run):
    """Where a run's result and weights are cached."""
    return cache_dir() / "runs" / f"{run.key()}.pt"


def cached_run(run: Run, dataset: Dataset | None = None, device: str = "cpu", progress: bool | None = False
               ) -> dict:
    """The result of ``run`` from the cache (``<cache>/runs``), or executed and cached now.

    The key covers the whole configuration, the torch version and a fingerprint of qlib's code
    (:func:`qlib.train.code_fingerprint`): a run shared by two chapters trains once per build, and
    a changed library never serves old results. The trained weights are cached beside the result
    (:func:`trained_model`).
    """
    path = run_path(run)
    if path.exists():
        return torch.load(path, weights_only=True)["result"]
    result, model = execute(run, dataset, device, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        torch.save({"result": result, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp.name, path)
    return result


def trained_model(run: Run, dataset: Dataset | None = None) -> nn.Module:
    """The network a cached run trained (running it first if it is not cached), in eval mode."""
    cached_run(run, dataset)
    with single_threaded():
        _, model, _ = prepared_model(run, dataset)
    state = torch.load(cache_dir() / "runs" / f"{run.key()}.pt", weights_only=True)["state_dict"]
    if run.post_training is not None and run.post_training.reconstruction is not None:
        for _, layer in qat.quantized_layers(model):  # the learned rounding's structure, then its state
            layer.weight_quantizer = ptq.AdaRoundWeights(layer.weight_quantizer, layer.weight)
    model.load_state_dict(state)
    return model.eval()


class Results:
    """The results of a grid of runs, in the order given: a tidy table and paired comparisons."""

    COLUMNS = ("float_val", "float_test", "start_val", "start_test", "val", "test", "seconds")

    def __init__(self, runs: list[Run], results: list[dict]):
        self.runs, self.results = list(runs), list(results)

    def table(self):
        """One row per run: label, network, bits, seed and the scalar measurements (for reconstructions
        also ``soft_val`` and ``soft_test``, the accuracies with the soft rounding; missing otherwise)."""
        rows = []
        for run, result in zip(self.runs, self.results):
            row = {"label": run.name, "network": run.network, "weight": run.weight, "act": run.act or run.weight,
                   "bits": run.bits_name, "seed": run.seed,
                   "epochs": 0 if run.post_training else run.recipe.epochs, "lr": run.recipe.lr}
            row.update({c: result[c] for c in self.COLUMNS})
            if "soft_test" in result:  # a reconstruction: accuracy before its decisions were made hard
                row.update(soft_val=result["soft_val"], soft_test=result["soft_test"])
            rows.append(row)
        return pd.DataFrame(rows)

    def select(self, **filters) -> list[tuple[Run, dict]]:
        """The (run, result) pairs whose fields (``label``, ``network``, ``bits``, ``seed``, ...) match."""
        def matches(run):
            for key, value in filters.items():
                actual = run.name if key == "label" else getattr(run, key)
                if actual != value:
                    return False
            return True

        return [(r, res) for r, res in zip(self.runs, self.results) if matches(r)]

    def correct(self, split: str = "test", **filters) -> np.ndarray:
        """``(seeds, examples)`` booleans of the matching runs, ordered by seed (one run per seed)."""
        chosen = sorted(self.select(**filters), key=lambda pair: pair[0].seed)
        if not chosen:
            raise ValueError(f"no run matches {filters}")
        seeds = [run.seed for run, _ in chosen]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{filters} matches several runs per seed; narrow it down")
        return np.stack([np.asarray(res[f"{split}_correct"]) for _, res in chosen])

    def summary(self, by=("label", "bits"), digits: int = 2):
        """Mean ± std over seeds per group: float, start (after calibration), final validation and test
        accuracy, and the test error ratio against the float network."""
        table = self.table()
        return summarise(table, list(by), {"float_test": "float (%)", "start_test": "start (%)",
                                           "val": "final val (%)", "test": "final test (%)"},
                         ratio="test", reference="float_test", digits=digits)

    def comparisons(self, pairs, split: str = "test", confidence: float = 0.95):
        """A table of paired comparisons: ``pairs`` of ``(method filter, baseline filter)`` dicts."""
        rows = []
        for method, baseline in pairs:
            c = self.compare(method, baseline, split, confidence)
            rows.append({"method": _describe_filter(method), "against": _describe_filter(baseline),
                         "difference (points)": f"{c.difference:+.2f}", f"{int(100 * confidence)} % interval":
                         f"[{c.low:+.2f}, {c.high:+.2f}]", "verdict": c.verdict})
        return pd.DataFrame(rows)

    def compare(self, method: dict, baseline: dict, split: str = "test", confidence: float = 0.95) -> Comparison:
        """``method`` against ``baseline`` (two filters, e.g. ``{"label": "LSQ+"}``), paired by seed and
        example (:func:`paired_difference`); both must cover the same seeds."""
        a, b = self.select(**method), self.select(**baseline)
        if sorted(r.seed for r, _ in a) != sorted(r.seed for r, _ in b):
            raise ValueError(f"{method} and {baseline} must cover the same seeds")
        return paired_difference(self.correct(split, **method), self.correct(split, **baseline), confidence)


def default_workers(device: str = "cpu") -> int:
    """How many runs train side by side: ``$QLIB_WORKERS``, else one per CPU core up to 2 on the CPU
    (each run on one thread: two single-threaded trainings finish sooner than one on two threads,
    and a busy machine slows them evenly), and 1 on an accelerator."""
    if "QLIB_WORKERS" in os.environ:
        return check_int(int(os.environ["QLIB_WORKERS"]), "QLIB_WORKERS", 1)
    return min(2, os.cpu_count() or 1) if device == "cpu" else 1


_POOL = {"key": None, "pool": None}


def _pool(workers: int):
    """A pool of worker processes kept for the session (starting one costs seconds: torch, qlib and the
    data load in every worker), made anew when the worker count or the cache folder changes."""
    import atexit
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    key = (workers, str(cache_dir()))
    if _POOL["key"] != key or _POOL["pool"] is None or getattr(_POOL["pool"], "_broken", False):
        if _POOL["pool"] is not None:
            _POOL["pool"].shutdown()
        else:
            atexit.register(lambda: _POOL["pool"] is not None and _POOL["pool"].shutdown())
        _POOL["pool"] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_setup, initargs=(key[1],))
        _POOL["key"] = key
    return _POOL["pool"]


def _worker_setup(cache):
    os.environ["QLIB_CACHE_DIR"], os.environ["QLIB_PROGRESS"] = cache, "0"
    torch.set_num_threads(1)


def _pretrain_in_worker(network, seed, model_kwargs):
    pretrained(network, seed, data=running_data(network), model_kwargs=dict(model_kwargs), progress=False)


def _run_in_worker(run, device):
    cached_run(run, None, device)


def run_grid(runs, dataset: Dataset | None = None, device: str = "cpu", progress: bool | None = None,
             workers: int | None = None) -> Results:
    """Run (or fetch from the cache) every configuration of ``runs``; returns :class:`Results`.

    Runs missing from the cache (and the float networks they start from) train in ``workers``
    processes side by side (default :func:`default_workers`; 1 trains here, in this process).
    Every run trains on one thread either way, so where it ran does not change its result.
    ``dataset`` (a data set of your own) always trains here. ``progress=None`` shows a bar over the
    runs unless ``$QLIB_PROGRESS`` is ``0``.
    """
    runs = list(runs)
    if not runs or not all(isinstance(r, Run) for r in runs):
        raise TypeError("runs must be a non-empty sequence of qlib.experiments.Run")
    if progress is None:
        progress = os.environ.get("QLIB_PROGRESS", "1") != "0"
    workers = default_workers(device) if workers is None else check_int(workers, "workers", 1)
    from tqdm.auto import tqdm

    missing = list(dict.fromkeys(r for r in runs if not run_path(r).exists()))
    if missing and workers > 1 and dataset is None:
        _pretrain_missing([(r.network, r.seed, r.model_kwargs) for r in missing], workers)
        pool = _pool(workers)
        futures = [pool.submit(_run_in_worker, r, device) for r in missing]
        for future in tqdm(futures, desc="runs", disable=not progress, unit="run"):
            future.result()
    results = [cached_run(run, dataset, device) for run in
               tqdm(runs, desc="runs", disable=not progress or (workers > 1 and dataset is None), unit="run")]
    return Results(runs, results)


def _pretrain_missing(floats, workers: int):
    """Train the float networks ``(network, seed, model_kwargs)`` not yet cached, in the pool."""
    floats = [f for f in dict.fromkeys(floats) if not pretrained_path(f[0], f[1], model_kwargs=dict(f[2]))[0].exists()]
    if floats:
        pool = _pool(workers)
        for future in [pool.submit(_pretrain_in_worker, *f) for f in floats]:
            future.result()


def pretrain(networks, seeds, model_kwargs: dict | None = None, workers: int | None = None) -> None:
    """Train the float running-example networks for every network x seed that is not cached yet, in
    ``workers`` processes side by side (default :func:`default_workers`); afterwards
    :func:`qlib.train.pretrained` loads each from the cache. The same weights as training them one
    by one with :func:`qlib.train.pretrained` (each trains on one thread, seeded)."""
    networks = [networks] if isinstance(networks, str) else list(networks)
    for network in networks:
        if network not in RECIPES:
            raise ValueError(f"networks must be names in {sorted(RECIPES)}, got {network!r}")
    seeds = [check_int(s, "seeds", 0) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    if not networks or not seeds:
        raise ValueError("networks and seeds must not be empty")
    kwargs = tuple(sorted(dict(model_kwargs or {}).items()))
    workers = default_workers() if workers is None else check_int(workers, "workers", 1)
    floats = [(n, s, kwargs) for n in networks for s in seeds]
    if workers > 1:
        _pretrain_missing(floats, workers)
    else:
        for network, seed, kw in floats:
            _pretrain_in_worker(network, seed, kw)


def grid(network: str, methods: dict, bits, seeds, recipe: QATRecipe = QATRecipe(), **fields) -> list[Run]:
    """Runs for every method x bit width x seed: ``methods`` maps a label to ``(weight, act)`` names
    (or one name for both); ``bits`` are ints (``W b A b``) or ``(weight, act)`` pairs; further
    :class:`Run` fields (``recipe`` per method: a dict label -> recipe) pass through."""
    runs = []
    for label, spec in methods.items():
        weight, act = (spec, spec) if isinstance(spec, str) else spec
        for b in bits:
            w_bits, a_bits = (b, b) if isinstance(b, int) else b
            for seed in seeds:
                r = recipe[label] if isinstance(recipe, dict) else recipe
                runs.append(Run(network, weight, act, w_bits, a_bits, seed, r, label=label, **fields))
    return runs
