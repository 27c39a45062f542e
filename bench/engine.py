"""Speed of the integer engine against PyTorch's int8 routes and float32 PyTorch.

Everything runs in this one process on the same network and batch, the contenders taking turns
call by call, and only ratios are printed (images per second relative to float32 PyTorch; higher
is faster):

    python bench/engine.py               # MnistCNN and Mnist1DCNN, batch 256
    python bench/engine.py --batch 64 --gemm-only
    python bench/engine.py --network-only --operations   # where the fast route's time goes

The int8 contenders: qlib's engine (the readable float32 and integer-only backends, and the fast
route, whose elementwise integer steps are fused loops compiled by numba); qlib's codes on fbgemm (prepacked
``torch.ao.nn.quantized`` modules, the deprecated route, kept because it is the one that runs the
engine's own codes on x86's int8 kernels) and on ExecuTorch's XNNPACK (:mod:`qlib.engine.export`);
and the flow a PyTorch user runs today, torchao's pt2e post-training quantization with its own
observers, lowered to ExecuTorch XNNPACK or compiled by ``torch.compile`` (X86InductorQuantizer).
"""

import argparse
import statistics
import time
import warnings

import torch

from qlib import data, engine, gemm
from qlib.engine.export import quiet_stack
from qlib.fold import fold_batchnorm
from qlib.train import RECIPES, pretrained

NETWORKS = ("mnist_cnn", "mnist1d_cnn")


def seconds(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(contenders: dict, repeats: int, warmup: int = 2) -> dict:
    """Median time of each contender, calling them in turn, so that a slow spell of the machine hits
    all of them alike instead of whichever happened to be running. Each turn makes one untimed call
    first: the runtimes keep their own worker threads (PyTorch's OpenMP pool, XNNPACK's), and the
    call right after another runtime's would otherwise pay for waking them."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def contenders(name, batch):
    """Every way this book runs the network: name -> a function of no arguments."""
    model, _ = pretrained(name, 0, progress=False)
    model.eval()
    dataset = data.load(RECIPES[name].data)
    calibration = dataset.calibration_batches(500)
    x = dataset.x_test[:batch]
    folded = fold_batchnorm(model)
    network = engine.convert(model, calibration)
    q = network.quantize_input(x)
    network7 = engine.convert(model, calibration, reduce_range=True)   # fbgemm's 7-bit activations
    fbgemm, q7 = engine.PyTorchQuantized(network7), network7.quantize_input(x)
    ours_on_xnnpack = engine.ExecuTorchNetwork(network, q, batch=batch).program
    x_codes = network.input_spec.dequantize(q)
    torchao_xnnpack = engine.ExecuTorchProgram(engine.pt2e_quantize(model, calibration, x), (x,))
    with quiet_stack():
        inductor = torch.compile(engine.pt2e_quantize(model, calibration, x, quantizer="x86_inductor"))

    def no_grad(fn):
        def call():
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")   # torch.ao's quantized tensors warn on every call
                return fn()
        return call

    return {
        "float32 PyTorch (folded BN)": no_grad(lambda: folded(x)),
        "qlib engine, float32 kernels": lambda: network.run(q, "float32"),
        "qlib engine, integer only": lambda: network.run(q, "int"),
        "qlib engine, fused loops (fast)": lambda: network.run(q, "fast"),
        "qlib codes on fbgemm (torch.ao, deprecated)": no_grad(lambda: fbgemm.run(q7)),
        "qlib codes on ExecuTorch XNNPACK": lambda: ours_on_xnnpack(x_codes),
        "torchao pt2e -> ExecuTorch XNNPACK": lambda: torchao_xnnpack(x),
        "torchao pt2e -> torch.compile (x86)": no_grad(lambda: inductor(x)),
    }


def network_table(batch, repeats):
    ratios = {}
    for name in NETWORKS:
        times = interleaved_seconds(contenders(name, batch), repeats)
        reference = times["float32 PyTorch (folded BN)"]
        ratios[name] = {label: reference / t for label, t in times.items()}
    labels = list(next(iter(ratios.values())))
    width = max(map(len, labels))
    print(f"whole network, batch {batch}")
    print("images/s relative to float32 PyTorch (higher is faster)")
    print(f"{'':<{width}} | " + " | ".join(f"{n:>11}" for n in NETWORKS))
    for label in labels:
        print(f"{label:<{width}} | " + " | ".join(f"{ratios[n][label]:>10.2f}x" for n in NETWORKS))
    for engine_label in ("qlib engine, float32 kernels", "qlib engine, fused loops (fast)"):
        print(f"\n{engine_label} relative to the same codes on")
        for label in ("qlib codes on fbgemm (torch.ao, deprecated)", "qlib codes on ExecuTorch XNNPACK"):
            cells = [ratios[n][engine_label] / ratios[n][label] for n in NETWORKS]
            print(f"{label:<{width}} | " + " | ".join(f"{c:>10.2f}x" for c in cells))
    return ratios


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


def operation_shares(network, q, backend="fast", repeats=15) -> dict:
    """Each operation's share of one run of ``network`` on codes ``q`` (medians over ``repeats``
    runs, timed operation by operation on that backend's own inputs), keyed by operation name."""
    env = {network.input_name: q}
    for op in network.ops:
        env[op.name] = op.forward(*(env[i] for i in op.inputs), backend=backend)
    times = {}
    for op in network.ops:
        args = [env[i] for i in op.inputs]
        times[op.name] = seconds(lambda: op.forward(*args, backend=backend), repeats)
    total = sum(times.values())
    return {name: t / total for name, t in times.items()}


def operation_table(network, q, repeats=15) -> list[dict]:
    """One row per operation of the fast route: kind, groups, how its sums run, share of a run (%)."""
    shares = operation_shares(network, q, "fast", repeats)
    rows = []
    for op in network.ops:
        layer = isinstance(op, engine.IntLayer)
        rows.append({"operation": op.name, "kind": op.kind if layer else type(op).__name__,
                     "groups": getattr(op, "groups", 1) if layer else "",
                     "sums": op.fast_route if layer else "", "share of the run (%)": 100 * shares[op.name]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--gemm-only", action="store_true", help="only the GEMM table")
    parser.add_argument("--network-only", action="store_true", help="only the whole-network table")
    parser.add_argument("--operations", action="store_true",
                        help="also each operation's share of the fast route's run, per network")
    args = parser.parse_args()
    ratios = None if args.gemm_only else network_table(args.batch, args.repeats)
    if args.operations:
        for name in NETWORKS:
            model, _ = pretrained(name, 0, progress=False)
            dataset = data.load(RECIPES[name].data)
            network = engine.convert(model.eval(), dataset.calibration_batches(500))
            print(f"\n{name}: share of one fast run, operation by operation")
            for row in operation_table(network, network.quantize_input(dataset.x_test[:args.batch]), args.repeats):
                print(f"{row['operation']:>22} {row['kind']:>11} {row['sums']:>16} {row['share of the run (%)']:6.1f} %")
    if not args.network_only:
        gemm_table(args.repeats)
    return ratios


if __name__ == "__main__":
    RATIOS = main()   # kept for a notebook's %run: network -> contender -> ratio to float32
