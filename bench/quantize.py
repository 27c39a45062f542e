"""Speed of qlib's fake quantization relative to PyTorch's native kernels, measured side by side.

Prints ratios only (time of qlib / time of the reference, same tensor, same process, median of
repeated runs): absolute times depend on the machine, ratios much less.

    python bench/quantize.py
"""

import statistics
import time

import numpy as np
import torch

from qlib.affine import fake_quantize, qparams_from_tensor


def median_seconds(fn, repeats=30, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    rows = []
    for shape in [(64, 64, 1, 1), (256, 256, 3, 3), (64, 128, 28, 28)]:
        x = torch.randn(shape)
        per_tensor = qparams_from_tensor(x, 8)
        per_channel = qparams_from_tensor(x, 8, "symmetric", True, axis=0)
        scale, zp = torch.from_numpy(per_channel.scale), torch.from_numpy(per_channel.zero_point)
        ref_t = median_seconds(lambda: torch.fake_quantize_per_tensor_affine(
            x, float(per_tensor.scale), int(per_tensor.zero_point), 0, 255))
        ref_c = median_seconds(lambda: torch.fake_quantize_per_channel_affine(
            x, scale, zp, 0, per_channel.qmin, per_channel.qmax))
        ours_t = median_seconds(lambda: fake_quantize(x, per_tensor))
        ours_c = median_seconds(lambda: fake_quantize(x, per_channel))
        x_np = x.numpy()
        ours_np = median_seconds(lambda: fake_quantize(x_np, per_tensor))
        rows.append((str(shape), ours_t / ref_t, ours_c / ref_c, ours_np / ref_t))
    print("fake quantization, time relative to PyTorch's native kernel (lower is faster)")
    print(f"{'shape':>20} | {'qlib per-tensor':>15} | {'qlib per-channel':>16} | {'qlib numpy per-tensor':>21}")
    for shape, a, b, c in rows:
        print(f"{shape:>20} | {a:>14.2f}x | {b:>15.2f}x | {c:>20.2f}x")
    print("(qlib checks its input for NaN/Inf and works on numpy and torch alike; PyTorch's kernels are fused.)")


if __name__ == "__main__":
    np.random.seed(0)
    main()
