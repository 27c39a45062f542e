"""Speed of the integer engine against PyTorch's quantized engine and float32 PyTorch.

Everything runs in this one process on the same network and batch, and only ratios are printed
(images per second relative to float32 PyTorch; higher is faster):

    python bench/engine.py               # MnistCNN and Mnist1DCNN, batch 256
    python bench/engine.py --batch 64 --gemm-only
"""

import argparse
import statistics
import time
import warnings

import torch

from qlib import data, engine, gemm
from qlib.fold import fold_batchnorm
from qlib.train import RECIPES, pretrained


def seconds(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def network_table(batch, repeats):
    print(f"whole network, batch {batch}: images/s relative to float32 PyTorch (higher is faster)")
    print(f"{'network':>12} | {'float32 PyTorch':>15} | {'PyTorch int8 (x86)':>18} | "
          f"{'qlib engine, float32 kernels':>28} | {'qlib engine, integer only':>25}")
    for name in ("mnist_cnn", "mnist1d_cnn"):
        model, _ = pretrained(name, 0, progress=False)
        dataset = data.load(RECIPES[name].data)
        calibration = [x for x, _ in dataset.train_batches(100, torch.Generator().manual_seed(0))][:5]
        network = engine.convert(model, calibration, reduce_range=True)
        pytorch_int8 = engine.PyTorchQuantized(network)
        folded = fold_batchnorm(model)
        x = dataset.x_test[:batch]
        q = network.quantize_input(x)
        with torch.no_grad():
            t_float = seconds(lambda: folded(x), repeats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_pt = seconds(lambda: pytorch_int8.run(q), repeats)
        t_f32 = seconds(lambda: network.run(q, "float32"), repeats)
        t_int = seconds(lambda: network.run(q, "int"), repeats)
        print(f"{name:>12} | {1.0:>14.2f}x | {t_float / t_pt:>17.2f}x | {t_float / t_f32:>27.2f}x | "
              f"{t_float / t_int:>24.2f}x")
        print(f"{'':>12}   qlib engine (float32 kernels) vs PyTorch int8: {t_pt / t_f32:.2f}x")


def gemm_table(repeats):
    import torch.ao.nn.quantized as nnq

    print("GEMM (M x K x N), uint8 x int8 -> int32 accumulator: speed relative to float32 matmul")
    print(f"{'shape':>18} | {'qlib float32-split':>18} | {'qlib _int_mm':>12} | {'int64 matmul':>12} | "
          f"{'PyTorch int8 linear':>19}")
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(256, 64, 64), (12544, 144, 32), (1024, 576, 64), (256, 1024, 1024)]:
        a = torch.randint(0, 256, (m, k), generator=g).to(torch.uint8)
        b = torch.randint(-127, 128, (k, n), generator=g).to(torch.int8)
        af, bf = a.float(), b.float()
        t_float = seconds(lambda: af @ bf, repeats)
        t_split = seconds(lambda: gemm.integer_matmul(a, b, "float32"), repeats)
        t_intmm = seconds(lambda: gemm.integer_matmul(a, b, "int_mm"), max(3, repeats // 3))
        t_int64 = seconds(lambda: gemm.integer_matmul(a, b, "int64"), max(3, repeats // 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.quantized.engine = "x86"
            lin = nnq.Linear(k, n)
            lin.set_weight_bias(torch._make_per_tensor_quantized_tensor(b.t().contiguous(), 0.01, 0), None)
            qa = torch._make_per_tensor_quantized_tensor(a, 0.02, 0)
            t_pt = seconds(lambda: lin(qa), repeats)
        print(f"{f'{m}x{k}x{n}':>18} | {t_float / t_split:>17.2f}x | {t_float / t_intmm:>11.2f}x | "
              f"{t_float / t_int64:>11.2f}x | {t_float / t_pt:>18.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--gemm-only", action="store_true", help="only the GEMM table")
    parser.add_argument("--network-only", action="store_true", help="only the whole-network table")
    args = parser.parse_args()
    if not args.gemm_only:
        network_table(args.batch, args.repeats)
    if not args.network_only:
        gemm_table(args.repeats)


if __name__ == "__main__":
    main()
