"""qlib: the small quantization library behind the book *Neural Network Quantization*.

One module per chapter: :mod:`qlib.affine` (the affine map), :mod:`qlib.observers`
(calibration and granularity); shared parts: :mod:`qlib.data`, :mod:`qlib.models`,
:mod:`qlib.train`, :mod:`qlib.plots`.
"""

from . import affine, data, models, observers, plots, train

__version__ = "0.1.0"
__all__ = ["affine", "data", "models", "observers", "plots", "train", "__version__"]
