"""Convert a float or quantization-aware-trained model into an :class:`~qlib.engine.IntegerNetwork`.

Fold the batch norms, trace the graph with ``torch.fx``, calibrate every activation the model does
not already quantize, and build the integer operations. A QAT model (:func:`qlib.qat.prepare`)
exports through the quantizer interface only: each layer's weights with
``weight_quantizer.export(weight)`` (uniform codes with their scales and zero-points, or
power-of-two codes, which become shift-add layers), its input grid with
``input_quantizer.qparams()``.
"""

from __future__ import annotations

import copy
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .._checks import check_bool, check_choice
from ..affine import qparams_from_tensor
from ..fold import fold_batchnorm
from ..observers import MinMaxObserver, Observer
from ..qat import QuantConvBn, QuantLayer
from ..quantizers import Exported
from .network import IntegerNetwork
from .ops import (ActSpec, IntAdd, IntAvgPool, IntClamp, IntFlatten, IntLayer, IntMaxPool, IntRequantize,
                  IntShiftAdd)

__all__ = ["convert", "ACTIVATION_DTYPES"]

ACTIVATION_DTYPES = ("uint8", "int8")
_CONVS = (nn.Conv1d, nn.Conv2d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_PASS = (nn.Identity, nn.Dropout)
_SUPPORTED = "Conv1d/Conv2d/Linear/ReLU/ReLU6/pooling/Flatten/add"


def convert(model: nn.Module, calibration, activation_dtype: str = "uint8", per_channel: bool = True,
            make_observer=MinMaxObserver, reduce_range: bool = False) -> IntegerNetwork:
    """Fold, trace, calibrate and convert ``model`` into an :class:`~qlib.engine.IntegerNetwork`.

    ``calibration`` is a list of input batches (float tensors, or ``(x, y)`` pairs). A float
    model's weights become 8-bit symmetric narrow-range codes (per output channel unless
    ``per_channel=False``); every activation gets asymmetric 8-bit parameters from
    ``make_observer()`` (min-max by default). A QAT model keeps its trained grids (see the module
    docstring). ``reduce_range=True`` uses 7-bit activation codes, as PyTorch's x86 backend does:
    its AVX2 kernels add pairs of uint8 x int8 products in int16, which saturates for 8-bit
    activations (2 * 255 * 127 > 2^15 - 1). A quantizer state the engine cannot run (more than 8
    weight bits, per-channel or non-uniform activation grids) raises ``ValueError`` naming the layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice(activation_dtype, "activation_dtype", ACTIVATION_DTYPES)
    check_bool(per_channel, "per_channel")
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    if not batches:
        raise ValueError("calibration must hold at least one batch")
    model = copy.deepcopy(model).cpu()  # conversion runs on the CPU, whatever device the model trained on
    batches = [b.cpu() for b in batches]

    folded, factors = fold_batchnorm(model, return_factors=True)
    for name, module in list(folded.named_modules()):
        if isinstance(module, QuantConvBn):  # batch norm folded during training: take its inference form
            parent_name, _, child = name.rpartition(".")
            setattr(folded.get_submodule(parent_name) if parent_name else folded, child, module.to_quantized_conv())
    gm = fx.GraphModule(folded, _Tracer().trace(folded))
    modules = dict(gm.named_modules())
    _check_supported(list(gm.graph.nodes), modules)
    exported = {}  # QAT layers: their weights as integers, batch norm folded in
    weight_bits = {}  # and their grids' bit widths (mixed precision: one per layer)
    for target, module in modules.items():
        if not isinstance(module, QuantLayer):
            continue
        export = _exported_weights(model, target, factors)
        if export is not None:
            exported[target] = export
            weight_bits[target] = _active_quantizer(model.get_submodule(target), "weight_quantizer").bits
            # Calibrate the folded copy with exactly the weights the engine will use (its weight quantizer
            # learned the unfolded weights' grid and must not re-quantize the folded ones).
            with torch.no_grad():
                module.weight.copy_(export.dequantize().to(module.weight.dtype))
            module.weight_quantizer.enabled = False
    for node in list(gm.graph.nodes):  # folded batch norms became Identity: drop them so ReLUs fuse
        if node.op == "call_module" and isinstance(modules[node.target], _PASS):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    nodes = list(gm.graph.nodes)

    observers = {n.name: make_observer() for n in nodes if n.op not in ("output", "get_attr")}
    for o in observers.values():
        if not isinstance(o, Observer):
            raise TypeError("make_observer must return a qlib.observers.Observer")
    recorder = _Recorder(gm, observers)
    with torch.no_grad():
        for x in batches:
            recorder.run(x)
    signed = activation_dtype == "int8"
    act_bits = 7 if check_bool(reduce_range, "reduce_range") else 8
    by_name = {n.name: n for n in nodes}
    wanted = _exported_input_grids(nodes, modules)  # tensor name -> {consumer name: spec} (QAT models)

    def spec(name):
        grids = wanted.get(name, {})
        if grids and len(set(grids.values())) == 1 and len(grids) == len(by_name[name].users):
            return next(iter(grids.values()))  # every consumer is a trained quantizer with this grid
        qp = observers[name].qparams(act_bits, "asymmetric", signed)
        return ActSpec(float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax, torch.int8 if signed else torch.uint8)

    def input_for(node, source):
        """The name of ``source``'s codes on the grid ``node`` expects, adding a requantization if needed."""
        target = wanted.get(node.args[0].name, {}).get(node.name)
        if target is None or target == specs[source]:
            return source
        op = IntRequantize(f"{node.name}_input", [source], specs[source], target)
        ops.append(op)
        specs[op.name] = target
        return op.name

    fused = {}  # relu node name -> the node whose op absorbed it
    alias = {}  # node name -> the name whose codes it shares
    ops, input_name, output_name = [], None, None

    def src(n):
        while n in alias:
            n = alias[n]
        return n

    specs = {}
    for node in nodes:
        if node.op == "placeholder":
            input_name = node.name
            specs[node.name] = spec(node.name)
            continue
        if node.op == "output":
            output_name = src(node.args[0].name)
            continue
        if node.name in fused:
            alias[node.name] = fused[node.name]
            continue
        ins = [src(a.name) for a in node.args if isinstance(a, fx.Node)]
        module = modules.get(node.target) if node.op == "call_module" else None
        users = list(node.users)
        follower = users[0] if len(users) == 1 else None
        activation = _activation_of(follower, modules) if follower is not None else None
        out_name = follower.name if activation else node.name
        if isinstance(module, (*_CONVS, nn.Linear)):
            ins = [input_for(node, ins[0])]
            op = _layer_op(node.name, ins, module, specs[ins[0]], spec(out_name), activation, per_channel,
                           exported.get(node.target))
            op.weight_bits = weight_bits.get(node.target, 8)
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            op = IntAdd(node.name, ins, specs[ins[0]], specs[ins[1]], spec(out_name), activation)
        elif _activation_of(node, modules):
            op = IntClamp(node.name, ins, specs[ins[0]], _activation_of(node, modules))
            activation = None
        elif isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
            op, activation = IntMaxPool(node.name, ins, module, specs[ins[0]]), None
        elif isinstance(module, _POOLS):
            op, activation = IntAvgPool(node.name, ins, module, specs[ins[0]]), None
        elif isinstance(module, nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten) or (
                node.op == "call_method" and node.target == "flatten"):
            start = module.start_dim if module is not None else (node.args[1] if len(node.args) > 1 else 1)
            op, activation = IntFlatten(node.name, ins, specs[ins[0]], start), None
        else:  # _check_supported has already refused anything else
            raise AssertionError(node)
        if activation:
            fused[follower.name] = node.name
        specs[node.name] = op.out
        ops.append(op)
    return IntegerNetwork(ops, input_name, specs[input_name], output_name)


def _conv_params(module):
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ValueError("only explicit zero padding is supported")
    return module.stride, module.padding, module.dilation, module.groups


def _layer_op(name, inputs, module, in_spec, out_spec, activation, per_channel, export: Exported | None):
    """The integer op of a conv/linear layer: from its trained export, or 8-bit codes of its float weights."""
    try:
        conv = _conv_params(module)
    except ValueError as error:
        raise ValueError(f"layer {name!r}: {error}") from None
    channels = module.weight.shape[0]
    if export is None:  # the engine's own choice: 8-bit symmetric narrow-range weights from the float weights
        w = module.weight.detach().double()
        qp = qparams_from_tensor(w, 8, "symmetric", True, True, axis=0 if per_channel else None)
        scale = np.broadcast_to(qp.scale.astype(np.float64), (channels,))
        shape = (-1, *[1] * (w.ndim - 1))
        codes = torch.clamp(torch.round(w / torch.from_numpy(scale.copy()).reshape(shape)), -127, 127)
        return IntLayer(name, inputs, codes, 0, scale, module.bias, in_spec, out_spec, activation, conv)
    if export.grid in ("pot", "apot"):
        return IntShiftAdd(name, inputs, export.codes, export.channel_scales(channels), module.bias, in_spec,
                           out_spec, activation, conv)
    return IntLayer(name, inputs, export.codes, export.channel_zero_points(channels), export.channel_scales(channels),
                    module.bias, in_spec, out_spec, activation, conv, fine_bias=True)


class _Recorder(fx.Interpreter):
    def __init__(self, gm, observers):
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.observers and isinstance(out, torch.Tensor) and torch.is_floating_point(out):
            self.observers[n.name](out)
        return out


class _Tracer(fx.Tracer):
    """Treats qlib's quantized layers as single operations, like the torch.nn layers they replace."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, QuantLayer) or super().is_leaf_module(m, qualname)


def _activation_of(node, modules):
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU6):
            return "relu6"
        if isinstance(m, nn.ReLU):
            return "relu"
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return "relu"
    return None


def _active_quantizer(module, attribute):
    q = getattr(module, attribute, None)
    return q if q is not None and q.enabled else None


def _exported_input_grids(nodes, modules) -> dict[str, dict[str, ActSpec]]:
    """For a QAT model: the grid each quantized layer's input quantizer expects, keyed by the input tensor."""
    grids = {}
    for node in nodes:
        q = _active_quantizer(modules.get(node.target), "input_quantizer") if node.op == "call_module" else None
        if q is None:
            continue
        try:
            qp = q.qparams()
        except ValueError as error:
            raise ValueError(f"layer {node.target!r}: the engine runs uniform activation grids only ({error})") \
                from None
        if qp.axis is not None:
            raise ValueError(f"layer {node.target!r}: the engine needs one activation scale per tensor, "
                             f"got a per-channel input grid (axis={qp.axis})")
        if qp.bits > 8:
            raise ValueError(f"layer {node.target!r}: activations must have at most 8 bits, got {qp.bits}")
        grids.setdefault(node.args[0].name, {})[node.name] = ActSpec(
            float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax, torch.int8 if qp.signed else torch.uint8)
    # Flatten and max pooling commute with quantization (a reshape, an order statistic): a grid wanted
    # after them is wanted before them, so the tensor is rounded once, as in the fake-quant model.
    for node in reversed(nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        passes = isinstance(module, (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d)) or (
            node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten")
        wanted = grids.get(node.name, {})
        if passes and wanted and len(set(wanted.values())) == 1 and len(wanted) == len(node.users):
            grids.setdefault(node.args[0].name, {})[node.name] = next(iter(wanted.values()))
    return grids


def _exported_weights(model, target, factors) -> Exported | None:
    """A trained layer's weights as integers, batch norm folded in (``None`` without an active weight quantizer).

    Folding multiplies channel ``c`` by ``f_c = gamma / sigma``. On the trained grid that is exact:
    ``f s (q - z) = (|f| s) (sign(f) q - sign(f) z)``: the scale takes ``|f|`` (one scale per channel,
    also for power-of-two codes: the shifts and additions need only the integer codes), the codes and
    the zero-point the sign. A flipped code that leaves int8 (``-(-128)``) moves down by one with its
    zero-point, which leaves ``q - z`` unchanged.
    """
    original = model.get_submodule(target)
    q = _active_quantizer(original, "weight_quantizer")
    if q is None:
        return None
    # a QuantConvBn quantized its folded weights during training; other layers their own weights
    weight = original.folded()[0].detach() if isinstance(original, QuantConvBn) else original.weight.detach()
    with torch.no_grad():
        q(weight)  # refresh a range computed from the current weights
    try:
        export = q.export(weight)
    except ValueError as error:
        raise ValueError(f"layer {target!r}: {error}") from None
    if export.qmin < -128 or export.qmax > 127:
        raise ValueError(f"layer {target!r}: weight codes in [{export.qmin}, {export.qmax}] do not fit int8 "
                         f"(the engine runs at most 8 weight bits)")
    if target not in factors:
        return export
    f = factors[target].double()
    channels = weight.shape[0]
    shape = (-1, *[1] * (weight.ndim - 1))
    sign = torch.where(f < 0, -1, 1).to(torch.int64)
    codes = export.codes * sign.reshape(shape)
    zero_points = torch.from_numpy(export.channel_zero_points(channels)) * sign
    overflow = (codes > 127).reshape(channels, -1).any(dim=1).to(torch.int64)
    codes, zero_points = codes - overflow.reshape(shape), zero_points - overflow
    scale = torch.from_numpy(export.channel_scales(channels)) * f.abs()
    return Exported(codes, scale, zero_points, -128, 127, 0, export.grid)


def _check_supported(nodes, modules):
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, (*_CONVS, nn.Linear, nn.ReLU, nn.ReLU6, *_POOLS, nn.Flatten, *_PASS)):
                continue
            raise ValueError(f"unsupported layer {node.target!r} of type {type(m).__name__}; the integer engine "
                             f"supports {_SUPPORTED}")
        if node.op == "call_function" and node.target in (operator.add, torch.add, torch.flatten, F.relu, torch.relu):
            continue
        if node.op == "call_method" and node.target == "flatten":
            continue
        target = getattr(node.target, "__name__", node.target)
        raise ValueError(f"unsupported operation {node.name!r} ({node.op} {target}); the integer engine supports "
                         f"{_SUPPORTED}")
