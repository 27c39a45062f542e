"""qlib: the small quantization library behind the book *Neural Network Quantization*.

One module per chapter: :mod:`qlib.affine` (the affine map), :mod:`qlib.observers`
(calibration and granularity), :mod:`qlib.fixedpoint` and :mod:`qlib.gemm` (integer matrix
multiplication), :mod:`qlib.fold` and :mod:`qlib.engine` (a whole network in integers),
:mod:`qlib.quantizers` and :mod:`qlib.qat` (training with quantization), :mod:`qlib.hessian`
(Hessian traces), :mod:`qlib.shiftadd` (power-of-two weights by shifts and additions),
:mod:`qlib.ptq` (post-training quantization), :mod:`qlib.sensitivity` (layer sensitivity and
bit allocation) and :mod:`qlib.nce` (the width search of neural channel expansion).
Shared parts: :mod:`qlib.data`, :mod:`qlib.models`, :mod:`qlib.train`, :mod:`qlib.experiments`,
:mod:`qlib.plots`.
"""

from . import affine, data, engine, experiments, fixedpoint, fold, gemm, hessian, models, observers, plots  # noqa: F401
from . import nce, ptq, qat, quantizers, sensitivity, shiftadd, train  # noqa: F401

__version__ = "0.1.0"
__all__ = ["affine", "data", "engine", "experiments", "fixedpoint", "fold", "gemm", "hessian", "models", "nce",
           "observers", "plots", "ptq", "qat", "quantizers", "sensitivity", "shiftadd", "train", "__version__"]
