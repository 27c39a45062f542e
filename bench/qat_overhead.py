"""Training-step time of quantization-aware training, relative to float training.

Same model (MnistCNN, then Mnist1DCNN), same batch, same optimizer, measured side by side in one
process: float training, qlib QAT at W4A4 (observed min/max ranges with the straight-through
estimator, LSQ on its fused path, LSQ through autograd step by step: the readable reference) and
the QAT a PyTorch user runs today, torchao's pt2e flow (``torch.export`` -> ``prepare_qat_pt2e`` with
ExecuTorch's XNNPACKQuantizer: per-channel symmetric weights, moving-average min-max ranges and
PyTorch's fused fake-quantize kernels, here at W4A4 too), taking turns step by step. Prints
ratios of median step times only (lower is faster).

    python bench/qat_overhead.py
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from qlib import data, qat
from qlib.models import Mnist1DCNN, MnistCNN
from qlib.quantizers import LSQ, STE


class ReadableSTE(STE):
    """The straight-through estimator through autograd, op by op (a subclass skips the fused path)."""


def readable_lsq(model, x):
    return qat.prepare(model, lambda b, m: LSQ(b, signed=True, axis=0, rounding=ReadableSTE()),
                       lambda b, s: LSQ(b, signed=s, rounding=ReadableSTE()), bits=4, example_input=x)


def make_step(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def step_seconds(models: dict, x, y, repeats, warmup=3) -> dict:
    """Median step time of each model; the models take turns, so that a slow spell of the
    machine hits all of them alike instead of whichever happened to be running."""
    steps = {name: make_step(m, x, y) for name, m in models.items()}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def torchao_qat(model, x, bits=4):
    """torchao's pt2e QAT of ``model`` at W``bits``A``bits`` (16 levels: weights [-8, 7], activations
    an affine 16-level range), the XNNPACK quantizer's fake-quantize modules."""
    from qlib.engine.export import quiet_stack

    with quiet_stack():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer, get_symmetric_quantization_config)
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        half = 2 ** (bits - 1)
        config = get_symmetric_quantization_config(is_per_channel=True, is_qat=True, act_qmin=-half,
                                                   act_qmax=half - 1, weight_qmin=-half, weight_qmax=half - 1)
        exported = torch.export.export(copy.deepcopy(model).train(), (x,)).module()
        prepared = prepare_qat_pt2e(exported, XNNPACKQuantizer().set_global(config))
        allow_exported_model_train_eval(prepared)   # so that .train() works as for the others
        return prepared


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    for network, dataset in ((MnistCNN, data.load_mnist5k()), (Mnist1DCNN, data.load_mnist1d())):
        torch.manual_seed(0)
        x, y = dataset.x_train[:args.batch], dataset.y_train[:args.batch]
        model = network()
        contenders = {
            "float32": copy.deepcopy(model),
            "qlib QAT, min/max + STE (W4A4)": qat.prepare(model, "minmax", "minmax", bits=4, example_input=x),
            "qlib QAT, LSQ (W4A4)": qat.prepare(model, "lsq", "lsq", bits=4, example_input=x),
            "qlib QAT, LSQ through autograd": readable_lsq(model, x),
            "torchao pt2e QAT (W4A4)": torchao_qat(model, x),
        }
        times = step_seconds(contenders, x, y, args.repeats)
        print(f"{network.__name__}, training step, batch {args.batch}: time relative to float32 (lower is faster)")
        for name, t in times.items():
            print(f"{name:>36} | {t / times['float32']:.2f}x")
        peer = times["torchao pt2e QAT (W4A4)"]
        for name in ("qlib QAT, min/max + STE (W4A4)", "qlib QAT, LSQ (W4A4)"):
            print(f"{name:>36} | {times[name] / peer:.2f}x the torchao QAT step")


if __name__ == "__main__":
    main()
