"""int8 static quantization of an urbanseg ONNX export (`urbanseg export --quantize int8`).

ONNX Runtime's `quantize_static` in QDQ format (uint8 activations, int8 per-channel
weights, min/max calibration on images of the run's shards), plus graph passes that
decide the speed on a CPU (measured per node with ONNX Runtime's profiler, see
docs/benchmarks.md#int8):

- before quantizing (float graph): ONNX Runtime's basic optimisations (`quant_pre_process`:
  shared biases behind Identity nodes become initializers, so every Conv can be quantized);
  HardSwish written as x * HardSigmoid(x) (ONNX Runtime has no integer HardSwish);
  the layers from the input on that stay at <= 16 channels (normalisation, padding,
  MobileNetV3's stem with its HardSwish fused again and its first block) and any other
  convolution over <= 4 input channels (the stem) stay float: ONNX Runtime's blocked
  float kernels beat its int8 ones there, and no Q/DQ pair is spent around them; so does
  the last Resize before the output with its crops (the full-resolution upsampling of the
  logits), where ONNX Runtime's uint8 Resize is no faster and Q/DQ would cost a pass over
  every output pixel.
- after quantizing (QDQ graph): HardSigmoid(x) = clip(alpha x + beta, 0, 1) becomes a
  requantization: DQ(x, scale * alpha) + beta -> Q(scale 1/255, zero point 0), which ONNX
  Runtime fuses into one integer QLinearAdd (uint8 saturation is the clip); the other
  resizes run on uint8 (DQ -> Resize -> Q with equal parameters becomes a uint8 Resize).

All temporary files go to a `tempfile.TemporaryDirectory` (ONNX tooling writes
``<uuid>.data`` files into the working directory otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STEM_MAX_CHANNELS = 4  # convolutions over this few input channels stay float
NARROW_CHANNELS = 16  # the layers from the input on up to this many channels stay float
DEPTHWISE_ALIGN = 16  # channel multiple of ONNX Runtime's fast int8 depthwise kernel (MLAS ConvSym)
INT8_SUFFIX = ".int8.onnx"
METHOD = (
    "onnxruntime quantize_static, QDQ, per-channel symmetric int8 weights, uint8 activations, MinMax calibration; "
    "depthwise channels padded to 16, HardSigmoid as requantization, uint8 Resize inside, the 16-channel "
    "layers from the input on and the full-resolution tail in float"
)


def int8_path(fp32: Path) -> Path:
    """`runs/NAME/best.onnx` -> `runs/NAME/best.int8.onnx`."""
    return fp32.with_name(fp32.name.removesuffix(".onnx") + INT8_SUFFIX)


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize_onnx` did: `float_nodes` are the compute nodes left in float."""

    float_nodes: list[str]
    requantized_hardsigmoids: int
    uint8_resizes: int
    padded_depthwise: int


def quantize_onnx(fp32: Path, out: Path, images: Sequence[np.ndarray]) -> QuantizeResult:
    """Write the int8 (QDQ) version of ONNX model `fp32` to `out`, calibrated on `images`
    ((3, H, W) uint8 or (1, 3, H, W) float32, 0..255, as the model takes them). Metadata props of `fp32`
    are kept. Temporary files live in a TemporaryDirectory, never in the cwd."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="urbanseg-int8-") as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        float_nodes, padded = prepare_float(fp32, prepared)
        raw = Path(tmp) / "qdq.onnx"
        quantize_static(
            str(prepared),
            str(raw),
            _Reader(images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=float_nodes,
            # One image at a time (its min/max merged into the running range): bounded memory.
            extra_options={"CalibStridedMinMax": 1},
        )
        model = onnx.load(str(raw))
        hardsigmoids = _hardsigmoid_as_requantization(model.graph)
        resizes = _uint8_resize(model.graph)
        source = onnx.load(str(fp32), load_external_data=False)
        del model.metadata_props[:]
        model.metadata_props.extend(source.metadata_props)
        model.producer_name, model.producer_version = source.producer_name, source.producer_version
        onnx.checker.check_model(model)
        onnx.save(model, str(out))
    return QuantizeResult(float_nodes, hardsigmoids, resizes, padded)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools log advice through the root logger ("consider
    pre-processing", already done here) and warn about each initializer they drop; the
    user sees the outcome instead. Restored afterwards."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)


def prepare_float(fp32: Path, out: Path) -> tuple[list[str], int]:
    """The float graph `quantize_onnx` quantizes, written to `out` (same function as
    `fp32`): ONNX Runtime's basic optimisations, HardSwish split, depthwise channels
    padded. Returns (nodes to keep in float, depthwise convolutions padded)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="urbanseg-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
    _name_nodes(model.graph)
    prefix = _float_prefix(onnx.shape_inference.infer_shapes(model).graph)
    prefix = _fuse_hardswish(model.graph, prefix)
    _split_hardswish(model.graph, keep=set(prefix))
    padded = _pad_depthwise_channels(model.graph)
    stem = [name for name in _stem_convs(model.graph) if name not in prefix]
    float_nodes = prefix + stem + _float_tail(model.graph)
    onnx.save(model, str(out))
    return float_nodes, padded


class _Reader:
    """An onnxruntime CalibrationDataReader over (3, H, W) uint8 or (1, 3, H, W) float32
    images, with the `set_range` that ``CalibStridedMinMax`` uses: ranges are reduced after
    every `stride` images, so memory holds one image's activations, not N."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self.images = images
        self.set_range(0, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it: Iterator[np.ndarray] = iter(self.images[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._it, None)
        if image is None:
            return None
        return {"image": np.ascontiguousarray(image, dtype=np.float32).reshape(1, *image.shape[-3:])}


# ---- graph passes -------------------------------------------------------------------


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _initializers(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def _name_nodes(graph: Any) -> None:
    """Give every unnamed node a unique name (ONNX Runtime's pre-processing inlines
    HardSwish as unnamed HardSigmoid and Mul nodes; the quantizer excludes nodes by name)."""
    taken = {node.name for node in graph.node}
    for k, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _fuse_hardswish(graph: Any, names: list[str]) -> list[str]:
    """Among the nodes named in `names`, Mul(x, HardSigmoid(x; 1/6, 1/2)) becomes one
    HardSwish(x) again (named as the Mul), which ONNX Runtime fuses into the float
    convolution before it. Returns `names` without the removed HardSigmoids."""
    from onnx import helper

    chosen = set(names)
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    removed = set()
    for mul in list(graph.node):
        if mul.op_type != "Mul" or mul.name not in chosen or len(mul.input) != 2:
            continue
        for x, gate in (mul.input, reversed(mul.input)):
            hs = producer.get(gate)
            if hs is None or hs.op_type != "HardSigmoid" or hs.name not in chosen or hs.input[0] != x:
                continue
            if len(consumers.get(gate, [])) != 1 or not np.isclose(_attr(hs, "alpha", 0.2), 1 / 6):
                continue
            if not np.isclose(_attr(hs, "beta", 0.5), 0.5):
                continue
            position = list(graph.node).index(mul)
            graph.node.remove(mul)
            graph.node.insert(position, helper.make_node("HardSwish", [x], list(mul.output), name=mul.name))
            graph.node.remove(hs)
            removed.add(hs.name)
            break
    return [name for name in names if name not in removed]


def _split_hardswish(graph: Any, keep: set[str]) -> None:
    """HardSwish(x) -> Mul(x, HardSigmoid(x; 1/6, 1/2)) (its definition), in place, except
    the nodes named in `keep` (float: ONNX Runtime fuses a float HardSwish into its convolution)."""
    from onnx import helper

    nodes = []
    for node in graph.node:
        if node.op_type != "HardSwish" or node.name in keep:
            nodes.append(node)
            continue
        gate = node.output[0] + "_hardsigmoid"
        nodes.append(
            helper.make_node(
                "HardSigmoid", [node.input[0]], [gate], name=node.name + "_hardsigmoid", alpha=1 / 6, beta=0.5
            )
        )
        nodes.append(helper.make_node("Mul", [node.input[0], gate], [node.output[0]], name=node.name + "_mul"))
    del graph.node[:]
    graph.node.extend(nodes)


# Ops that act on each channel alone (with (N, C, 1, 1) broadcasting): a padded channel
# never mixes into a real one through them.
_PER_CHANNEL = {"Relu", "HardSigmoid", "HardSwish", "Sigmoid", "Mul", "Clip", "GlobalAveragePool", "Identity"}


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _pad_depthwise_channels(graph: Any, align: int = DEPTHWISE_ALIGN) -> int:
    """Pad the channels of depthwise convolutions to a multiple of `align`, in place (float
    graph): ONNX Runtime's fast symmetric int8 depthwise kernel needs a channel count that
    is a multiple of 16 (MobileNetV3's 72, 120, 184, 200 take a scalar-ish path otherwise).

    The tensors around such a convolution that share its channels (reached through
    per-channel ops) get zero channels: the convolution producing them gets zero output
    filters and bias, every convolution reading them zero input weights, so the result is
    unchanged. A group touching any other op is left alone. Returns the number padded."""
    init = _initializers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    padded = 0
    for node in list(graph.node):
        if node.op_type != "Conv" or node.input[1] not in init:
            continue
        weight = init[node.input[1]]
        channels = int(weight.dims[0])
        if _attr(node, "group", 1) != channels or weight.dims[1] != 1 or channels % align == 0:
            continue
        plan = _channel_group(node.input[0], producer, consumers, outputs, init, channels)
        if plan is None:
            continue
        target = -(-channels // align) * align
        for conv, axis in plan:
            _pad_conv(graph, conv, axis, target, init)
        padded += 1
    if padded:  # recorded shapes are stale now (the quantizer infers them again); old weights unused
        del graph.value_info[:]
        _drop_unused(graph)
    return padded


def _spatial_mean(node: Any, init: dict[str, Any]) -> bool:
    """Whether `node` is a ReduceMean over height and width only (timm's squeeze-excite)."""
    if node.op_type != "ReduceMean":
        return False
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1] in init:
        axes = _value(init, node.input[1]).tolist()  # type: ignore[union-attr]
    return axes is not None and {int(a) % 4 for a in axes} == {2, 3}


def _channel_group(
    start: str, producer: dict, consumers: dict, outputs: set, init: dict, channels: int
) -> list[tuple[Any, str]] | None:
    """The convolutions to change so tensor `start` (and every tensor sharing its channels)
    can grow: [(conv, "out" | "in" | "depthwise")], or None when that is not safe."""
    seen_tensors, plan, todo = set(), {}, [start]
    while todo:
        tensor = todo.pop()
        if tensor in seen_tensors:
            continue
        if tensor in outputs or tensor in init:
            return None
        seen_tensors.add(tensor)
        maker = producer.get(tensor)
        if maker is None:
            return None
        nodes = [(maker, "made")] + [(user, "read") for user in consumers.get(tensor, [])]
        for op, how in nodes:
            if op.op_type == "Conv":
                w = init.get(op.input[1])
                if w is None or (len(op.input) > 2 and op.input[2] and op.input[2] not in init):
                    return None
                depthwise = _attr(op, "group", 1) == w.dims[0] == channels and w.dims[1] == 1
                if depthwise:
                    plan[op.name] = (op, "depthwise")
                    todo += [op.input[0], op.output[0]]
                elif how == "made":
                    if _attr(op, "group", 1) != 1:
                        return None
                    plan[op.name] = (op, "out")
                else:
                    if _attr(op, "group", 1) != 1 or op.input[0] != tensor:
                        return None
                    plan[op.name] = (op, "in")
            elif op.op_type in _PER_CHANNEL or _spatial_mean(op, init):
                todo += [t for t in list(op.input) + list(op.output) if t and t not in init]
            else:
                return None
    return list(plan.values())


def _pad_conv(graph: Any, conv: Any, how: str, target: int, init: dict[str, Any]) -> None:
    """Zero-pad `conv`'s weights (and bias) to `target` channels on the side `how` says,
    into new initializers (the old ones may be shared)."""
    from onnx import helper, numpy_helper

    def padded(name: str, axis: int) -> str:
        value = numpy_helper.to_array(init[name])
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, target - value.shape[axis])
        new = f"{conv.name or conv.output[0]}_{name}_padded{target}"
        graph.initializer.append(numpy_helper.from_array(np.pad(value, widths), new))
        return new

    if how in ("out", "depthwise"):
        conv.input[1] = padded(conv.input[1], 0)
        if len(conv.input) > 2 and conv.input[2]:
            conv.input[2] = padded(conv.input[2], 0)
    else:
        conv.input[1] = padded(conv.input[1], 1)
    if how == "depthwise":
        for a in conv.attribute:
            if a.name == "group":
                a.CopyFrom(helper.make_attribute("group", target))


def _float_tail(graph: Any) -> list[str]:
    """Names of the last Resize before the graph output and of the crops after it: the
    full-resolution upsampling of the logits. They stay float: ONNX Runtime's uint8 Resize
    is no faster than its float one, and quantizing there adds a Q and a DQ over every
    output pixel. Empty when the output does not end that way."""
    producer = {o: n for n in graph.node for o in n.output}
    names: list[str] = []
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type in ("Slice", "Identity", "Reshape"):
        names.append(node.name)
        node = producer.get(node.input[0])
    return names + [node.name] if node is not None and node.op_type == "Resize" else []


# Ops whose output has the channels of their first input.
_KEEP_CHANNELS = _PER_CHANNEL | {"Pad", "Add", "BatchNormalization", "Sub", "Div"}


def _channels(value_info: Any) -> int | None:
    """Channel count of a 4-D tensor's recorded type (None for other ranks or when unknown)."""
    dims = value_info.type.tensor_type.shape.dim
    return dims[1].dim_value or None if len(dims) == 4 else None


def _float_prefix(graph: Any) -> list[str]:
    """Names of the compute nodes that run on the input before any tensor is wider than
    NARROW_CHANNELS: the input normalisation, the padding, and for MobileNetV3 the stem, its
    HardSwish and the first 16-channel block (at half resolution: a third of the int8 model's
    time at 2048x1024). They stay float: ONNX Runtime runs them in its blocked float layout
    with the activations fused, while int8 kernels gain nothing over so few channels and
    a Q/DQ pair would be added around each. `graph` needs inferred shapes. Nodes without
    a 4-D output (shape arithmetic) extend the prefix but are not listed."""
    types = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    width = {name: _channels(v) for name, v in types.items()}
    names = []
    for node in graph.node:
        if not all(name in known for name in node.input if name):
            continue
        if node.op_type in _KEEP_CHANNELS and node.input[0] in width:  # shape inference loses them after a Pad
            width.update({o: width[o] or width[node.input[0]] for o in node.output})
        outputs = [o for o in node.output if o in types and len(types[o].type.tensor_type.shape.dim) == 4]
        if any((width.get(o) or NARROW_CHANNELS + 1) > NARROW_CHANNELS for o in outputs):  # unknown = wide
            continue
        known.update(node.output)
        if node.name and outputs:
            names.append(node.name)
    return names


def _stem_convs(graph: Any) -> list[str]:
    """Names of Conv nodes over <= STEM_MAX_CHANNELS input channels (weights are
    (O, I / group, kh, kw))."""
    init = _initializers(graph)
    names = []
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in init:
            dims = init[node.input[1]].dims
            if len(dims) == 4 and dims[1] * _attr(node, "group", 1) <= STEM_MAX_CHANNELS:
                names.append(node.name)
    return names


def _value(init: dict[str, Any], name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    return numpy_helper.to_array(init[name]) if name in init else None


def _qparams(node: Any, init: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) of a Q/DQ node when both are initializers."""
    scale = _value(init, node.input[1])
    zero = _value(init, node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
    return None if scale is None or zero is None else (scale, zero)


def _between_dq_and_q(graph: Any, op_type: str) -> Iterator[tuple[Any, Any, Any]]:
    """(node, its DequantizeLinear input, its one QuantizeLinear user) for every `op_type`
    node that sits between the two (the graph as it was when the walk started)."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    for node in list(graph.node):
        if node.op_type != op_type:
            continue
        dq = producer.get(node.input[0])
        users = consumers.get(node.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        yield node, dq, users[0]


def _hardsigmoid_as_requantization(graph: Any) -> int:
    """DQ(x; s, z) -> HardSigmoid(alpha, beta) -> Q(...) becomes
    DQ(x; s * alpha, z) + DQ(beta) -> Q(1/255, 0): ONNX Runtime fuses it into one QLinearAdd
    whose uint8 saturation is the clip to [0, 1]. The Q's consumers read the new (1/255, 0)
    parameters. Returns the number rewritten."""
    from onnx import helper, numpy_helper

    init = _initializers(graph)
    consumers = _consumers(graph)
    count = 0
    for node, dq, q in _between_dq_and_q(graph, "HardSigmoid"):
        params, out_params = _qparams(dq, init), _qparams(q, init)
        if params is None or out_params is None or params[0].ndim or out_params[1].dtype != np.uint8:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        if alpha <= 0:
            continue
        tag = node.name or node.output[0]
        scaled, gate_scale, gate_zero = f"{tag}_rq_scale", f"{tag}_rq_out_scale", f"{tag}_rq_out_zero"
        bias_q, bias_s, bias_z = f"{tag}_rq_beta", f"{tag}_rq_beta_scale", f"{tag}_rq_beta_zero"
        zero_dtype = params[1].dtype
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.asarray(params[0] * alpha, np.float32), scaled),
                numpy_helper.from_array(np.asarray(1 / 255, np.float32), gate_scale),
                numpy_helper.from_array(np.asarray(0, np.uint8), gate_zero),
                numpy_helper.from_array(np.asarray(0 if beta <= 0 else 1, zero_dtype), bias_q),
                numpy_helper.from_array(np.asarray(abs(beta) or 1.0, np.float32), bias_s),
                numpy_helper.from_array(np.asarray(1 if beta < 0 else 0, zero_dtype), bias_z),
            ]
        )
        x_dq = helper.make_node(
            "DequantizeLinear", [dq.input[0], scaled, dq.input[2]], [f"{tag}_rq_x"], name=f"{tag}_rq_x_dq"
        )
        b_dq = helper.make_node("DequantizeLinear", [bias_q, bias_s, bias_z], [f"{tag}_rq_b"], name=f"{tag}_rq_b_dq")
        add = helper.make_node("Add", [f"{tag}_rq_x", f"{tag}_rq_b"], [node.output[0]], name=f"{tag}_rq_add")
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for k, new in enumerate([x_dq, b_dq, add]):
            graph.node.insert(position + k, new)
        # The Q and every DQ reading its output take (1/255, 0): [0, 1] exactly.
        q.input[1], q.input[2] = gate_scale, gate_zero
        for user in consumers.get(q.output[0], []):
            if user.op_type == "DequantizeLinear":
                user.input[1], user.input[2] = gate_scale, gate_zero
        count += 1
    _drop_unused(graph)
    return count


def _uint8_resize(graph: Any) -> int:
    """DQ(q; s, z) -> Resize -> Q(s, z) with equal parameters becomes Resize(q) on uint8
    (ONNX Runtime keeps it in float otherwise; its uint8 kernel is several times faster).
    Returns the number rewritten."""
    init = _initializers(graph)
    count = 0
    for node, dq, q in _between_dq_and_q(graph, "Resize"):
        a, b = _qparams(dq, init), _qparams(q, init)
        if a is None or b is None or not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])):
            continue
        if a[1].dtype != np.uint8:
            continue
        node.input[0] = dq.input[0]
        node.output[0] = q.output[0]
        graph.node.remove(q)
        count += 1
    _drop_unused(graph)
    return count


def _drop_unused(graph: Any) -> None:
    """Remove nodes whose outputs nobody reads (not graph outputs) and unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session; `threads` 0 = ONNX Runtime's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no per-initializer warnings
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---- the export step ----------------------------------------------------------------


def pick_images(count: int, num: int) -> np.ndarray:
    """`num` indices spread evenly over `count` records (all of them when num >= count)."""
    if num >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, num).round().astype(np.int64))


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """(C, C) pixel counts [truth, prediction] of int arrays of one shape, ignore_index left
    out (the counting of `urbanseg.evaluation.metrics.ConfusionMatrix`, which the inference
    package may not import; tests/test_quantize.py checks they agree)."""
    keep = label != ignore_index
    index = label[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(counts: np.ndarray) -> float | None:
    """Dataset-level mean IoU of a confusion matrix; classes absent from truth and
    prediction are left out (None when no class is present)."""
    tp = np.diag(counts).astype(np.float64)
    union = counts.sum(0) + counts.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else None


@dataclass(frozen=True)
class Scores:
    miou_fp32: float | None
    miou_int8: float | None
    agreement: float
    images: int


def score_pair(fp32: Any, int8: Any, dataset: Any, num_classes: int, ignore_index: int) -> Scores:
    """Run ONNX Runtime sessions `fp32` and `int8` over every image of `dataset` (a
    ShardDataset): mIoU of each against the stored labels and the share of pixels where
    their argmax agrees."""
    from tqdm import tqdm

    counts = {key: np.zeros((num_classes, num_classes), np.int64) for key in ("fp32", "int8")}
    same = total = 0
    for index in tqdm(range(len(dataset)), desc="score fp32 vs int8", unit="image", dynamic_ncols=True):
        item = dataset[index]
        image = item["image"].numpy()[None].astype(np.float32)
        label = item["label"].numpy()
        preds = {}
        for key, sess in (("fp32", fp32), ("int8", int8)):
            preds[key] = sess.run(None, {"image": image})[0][0].argmax(0)
            counts[key] += confusion(preds[key], label, num_classes, ignore_index)
        same += int((preds["fp32"] == preds["int8"]).sum())
        total += preds["fp32"].size
    return Scores(miou(counts["fp32"]), miou(counts["int8"]), same / max(total, 1), len(dataset))
