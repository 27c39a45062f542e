"""Float accuracy of the running-example networks, mean ± std over seeds (from the training cache).

    python bench/float_baselines.py                   # MnistCNN and Mnist1DCNN, seeds 0 1 2
    python bench/float_baselines.py --cifar-root data # also ResNet-20 on CIFAR-10 (needs the data)
"""

import argparse

from qlib.models import count_parameters
from qlib.train import RECIPES, mean_std, pretrained


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cifar-root", default=None, help="folder holding cifar-10-batches-bin")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    networks = [("mnist_cnn", {}), ("mnist1d_cnn", {})]
    if args.cifar_root:
        networks.append(("resnet20", {"root": args.cifar_root}))
    print(f"{'network':>12} | {'data':>8} | {'params':>7} | float test accuracy (%), seeds {args.seeds}")
    for name, data_kwargs in networks:
        results = [pretrained(name, s, data_kwargs=data_kwargs, device=args.device) for s in args.seeds]
        accs = [meta["test_acc"] for _, meta in results]
        print(f"{name:>12} | {RECIPES[name].data:>8} | {count_parameters(results[0][0]):>7} | {mean_std(accs, 2)}"
              f"   (per seed: {', '.join(f'{a:.2f}' for a in accs)})")


if __name__ == "__main__":
    main()
