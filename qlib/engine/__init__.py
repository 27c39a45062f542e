"""A whole network in integers: convert a float model, then run it on integer codes only (chapter 4).

:func:`convert` takes a float model (batch norms are folded first) or a quantization-aware-trained
one, traces it with ``torch.fx``, calibrates the range of every activation it does not already
quantize, and builds an :class:`IntegerNetwork`:

* weights: int8 codes with one scale per output channel (or per tensor) and, for asymmetric
  trained grids, zero-points; a float model's weights become symmetric narrow-range ``[-127, 127]``;
  power-of-two (APoT/PoT) weights become shift-add layers (:class:`IntShiftAdd`);
* activations: uint8 with a zero-point (the paper's scheme) or int8;
* biases: int32 with scale ``S_in * S_w`` and zero-point 0;
* every layer ends in the fixed-point requantization of :mod:`qlib.fixedpoint`, and a ReLU or
  ReLU6 that follows a layer becomes the clamp of that requantization.

After conversion the float scales are gone from the inference path: :meth:`IntegerNetwork.run`
maps input codes to output codes with integer arithmetic (``quantize_input`` is the one float
step at the entrance, ``dequantize_output`` the one at the exit, for showing logits).

Supported layers: ``Conv1d``, ``Conv2d`` (any groups, so depthwise too), ``Linear``, ``ReLU``,
``ReLU6``, ``MaxPool1d/2d``, ``AvgPool1d/2d``, ``AdaptiveAvgPool1d/2d`` to size 1, ``Flatten`` /
``torch.flatten``, residual ``+``, ``Identity`` and ``Dropout``. Anything else is refused at
convert time with the layer's name and type.

Three backends compute the same codes (the tests check it bit for bit): ``"float32"`` (the
default, the route the book teaches) runs PyTorch's float kernels on integer values small enough
that every partial sum is below 2^24 (split along the input channels when needed) and requantizes
with readable tensor operations; ``"int"`` uses integer tensors only (an integer im2col and
``torch._int_mm``); ``"fast"`` fuses every elementwise integer step into one compiled loop
(:mod:`qlib.engine.fused`), keeps feature maps channels-last, and sums with ``torch._int_mm`` on
int8 codes where no window has to be copied (linear, 1-d and 1x1 convolutions; elsewhere float32).

The package: :mod:`qlib.engine.ops` (the integer operations), :mod:`qlib.engine.network` (the
interpreter), :mod:`qlib.engine.convert` (the converter), :mod:`qlib.engine.pytorch` (the same
network on PyTorch's quantized engine, for comparison), :mod:`qlib.engine.export` (the same codes as an
ExecuTorch program on XNNPACK, and torchao's own post-training flow as the peer), :mod:`qlib.engine.fused`
(the fast route's loops).
"""

from .convert import ACTIVATION_DTYPES, convert
from .network import ENGINE_BACKENDS, DtypeRecorder, IntegerNetwork
from .ops import (ActSpec, IntAdd, IntAvgPool, IntClamp, IntFlatten, IntLayer, IntMaxPool, IntOp, IntRequantize,
                  IntShiftAdd, average_codes, clamp_bounds)
from .pytorch import PyTorchQuantized
from .export import ExecuTorchNetwork, ExecuTorchProgram, agreement, pt2e_quantize, qdq_module

__all__ = ["convert", "IntegerNetwork", "PyTorchQuantized", "ExecuTorchNetwork", "ExecuTorchProgram", "pt2e_quantize",
           "qdq_module", "agreement", "DtypeRecorder", "ActSpec", "IntOp", "IntLayer",
           "IntShiftAdd", "IntAdd", "IntAvgPool", "IntMaxPool", "IntClamp", "IntRequantize", "IntFlatten",
           "average_codes", "clamp_bounds", "ACTIVATION_DTYPES", "ENGINE_BACKENDS"]
