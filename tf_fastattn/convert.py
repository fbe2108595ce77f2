"""`tf_fastattn.convert_model`: swap a built Keras model's attention and layer
norms for the fused layers, and fuse residual adds into the layer norms."""

from __future__ import annotations

import dataclasses
import logging

import keras

from tf_fastattn import _loader

logger = logging.getLogger("tf_fastattn.convert")

# Attention layers that look convertible but are not (their math or weights differ).
_UNCONVERTED_ATTENTION = tuple(
    cls
    for cls in (
        keras.layers.Attention,
        keras.layers.AdditiveAttention,
    )
    if cls is not None
)


@dataclasses.dataclass
class ConversionReport:
    """What `convert_model` did.

    replaced: `(layer name, "MultiHeadAttention" | "GroupedQueryAttention" | "LayerNormalization")` for each
      stock layer swapped for the fused one.
    fused_residual: `(add layer name, layer norm name)` for each
      `LayerNormalization(Add([x, y]))` that became one fused residual layer norm.
    skipped: `(layer name, reason)` for layers and patterns left as they were.
    """

    replaced: list = dataclasses.field(default_factory=list)
    fused_residual: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = [f"tf_fastattn.convert_model: {len(self.replaced)} layers replaced, "
                 f"{len(self.fused_residual)} residual adds fused, {len(self.skipped)} left as they were"]
        lines += [f"  replaced {name} ({kind})" for name, kind in self.replaced]
        lines += [f"  fused {add} + {ln}" for add, ln in self.fused_residual]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _normalized_axes(axis, rank):
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted(a % rank for a in axes) if rank else None


def _layer_norm_unsupported(layer, rank):
    """Why a stock LayerNormalization would not run fused, or None."""
    if getattr(layer, "rms_scaling", False):
        return "rms_scaling=True is not fused"
    if rank is None or _normalized_axes(layer.axis, rank) != [rank - 1]:
        return f"axis={layer.axis} is not the last axis"
    return None


class _Converter:
    def __init__(self, implementation, fuse_residual):
        self.implementation = implementation
        self.fuse_residual = fuse_residual
        self.report = ConversionReport()
        self.new_layers = {}  # id(old layer) -> new layer (shared layers stay shared)
        self.weight_pairs = []  # (old, new) whose weights are copied once built

    def _record_skip(self, layer, reason):
        entry = (layer.name, reason)
        if entry not in self.report.skipped:
            self.report.skipped.append(entry)

    def convert_layer(self, layer, rank=None):
        """The replacement of one layer: fused where supported, else a clone."""
        if id(layer) in self.new_layers:
            return self.new_layers[id(layer)]
        from tf_fastattn.layers import GroupedQueryAttention, LayerNormalization, MultiHeadAttention

        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless keras.ops operation in the graph: reused as is
        config = layer.get_config()
        if type(layer) is keras.layers.MultiHeadAttention:
            new = MultiHeadAttention.from_config({**config, "implementation": self.implementation})
            self.report.replaced.append((layer.name, "MultiHeadAttention"))
        elif type(layer) is keras.layers.GroupQueryAttention:
            new = GroupedQueryAttention.from_config({**config, "implementation": self.implementation})
            self.report.replaced.append((layer.name, "GroupedQueryAttention"))
        elif type(layer) is keras.layers.LayerNormalization and _layer_norm_unsupported(layer, rank) is None:
            new = LayerNormalization.from_config({**config, "implementation": self.implementation})
            self.report.replaced.append((layer.name, "LayerNormalization"))
        else:
            if isinstance(layer, (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention)):
                self._record_skip(layer, f"{type(layer).__name__} subclasses a Keras attention layer; not replaced")
            elif isinstance(layer, keras.layers.LayerNormalization):
                reason = _layer_norm_unsupported(layer, rank) or "a LayerNormalization subclass"
                self._record_skip(layer, f"{type(layer).__name__}: {reason}")
            elif isinstance(layer, _UNCONVERTED_ATTENTION):
                self._record_skip(layer, f"{type(layer).__name__} has no fused replacement")
            elif isinstance(layer, keras.Model):
                self._record_skip(layer, "nested model: cloned, not converted (convert it separately)")
            new = layer.__class__.from_config(config)
        self.new_layers[id(layer)] = new
        self.weight_pairs.append((layer, new))
        return new

    def copy_weights(self):
        for old, new in self.weight_pairs:
            if old.weights:
                new.set_weights(old.get_weights())


def _residual_layer_norm_pairs(model, conv):
    """Finds `LayerNormalization(Add([a, b]))` nodes that can become one fused call.

    Returns {id(add node): (ln node, whether the sum is also used elsewhere)}.
    """
    consumers = {}
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            for t in node.input_tensors:
                consumers.setdefault(id(t), []).append(node)
    outputs = {id(t) for t in model.outputs}
    layer_calls = {}
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            layer_calls[id(node.operation)] = layer_calls.get(id(node.operation), 0) + 1

    pairs = {}
    for nodes in model._nodes_by_depth.values():
        for ln_node in nodes:
            ln = ln_node.operation
            if type(ln) is not keras.layers.LayerNormalization or len(ln_node.input_tensors) != 1:
                continue
            (s,) = ln_node.input_tensors
            add, _, _ = s._keras_history
            if type(add) is not keras.layers.Add:
                continue
            add_node = add._inbound_nodes[s._keras_history[1]]
            a_b = add_node.input_tensors
            rank = len(s.shape)
            if len(a_b) != 2 or tuple(a_b[0].shape) != tuple(a_b[1].shape):
                conv._record_skip(add, f"Add of {len(a_b)} tensors or of broadcast shapes: not fused into {ln.name}")
                continue
            reason = _layer_norm_unsupported(ln, rank)
            if reason is not None:
                conv._record_skip(ln, f"not fused with {add.name}: {reason}")
                continue
            if layer_calls[id(ln)] > 1:
                conv._record_skip(ln, "called more than once (shared): residual add not fused")
                continue
            other_uses = len(consumers.get(id(s), [])) > 1 or id(s) in outputs
            pairs[id(add_node)] = (ln_node, other_uses)
    return pairs


def _convert_functional(model, conv):
    from tf_fastattn.layers import LayerNormalization

    pairs = _residual_layer_norm_pairs(model, conv) if conv.fuse_residual else {}
    done = set()  # ids of LN nodes already computed with their Add
    tensors = {}
    new_inputs = []
    for t in model.inputs:
        new = keras.Input(batch_shape=t.shape, dtype=t.dtype, sparse=getattr(t, "sparse", False),
                          name=t._keras_history[0].name)
        tensors[id(t)] = new
        new_inputs.append(new)

    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or id(node) in done:
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            if id(node) in pairs:
                ln_node, keep_sum = pairs[id(node)]
                ln = ln_node.operation
                fused = LayerNormalization.from_config(
                    {**ln.get_config(), "return_residual": keep_sum, "implementation": conv.implementation}
                )
                conv.new_layers[id(ln)] = fused
                conv.weight_pairs.append((ln, fused))
                conv.report.fused_residual.append((node.operation.name, ln.name))
                inputs = args[0] if args else kwargs["inputs"]
                result = fused(list(inputs))
                y, s = result if keep_sum else (result, None)
                tensors[id(ln_node.outputs[0])] = y
                if keep_sum:
                    tensors[id(node.outputs[0])] = s
                done.add(id(ln_node))
                continue
            rank = len(node.input_tensors[0].shape) if node.input_tensors else None
            layer = conv.convert_layer(node.operation, rank)
            outputs = layer(*args, **kwargs)
            for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
                tensors[id(old)] = new

    new_outputs = keras.tree.pack_sequence_as(model._outputs_struct, [tensors[id(t)] for t in model.outputs])
    return keras.Model(new_inputs, new_outputs, name=model.name)


def _input_rank(layer):
    try:
        return len(layer.input.shape)
    except (AttributeError, ValueError):  # not called yet, or called more than once
        return None


def convert_model(model, *, implementation: str = "auto", fuse_residual: bool = True, return_report: bool = False):
    """A copy of a built Keras model running the fused attention and layer norm.

    Every stock `keras.layers.MultiHeadAttention` becomes
    `tf_fastattn.layers.MultiHeadAttention`, every stock
    `keras.layers.GroupQueryAttention` becomes
    `tf_fastattn.layers.GroupedQueryAttention` (keys and values no longer
    repeated per query head), and every stock
    `keras.layers.LayerNormalization` over the last axis becomes
    `tf_fastattn.layers.LayerNormalization`, with their weights. In functional
    models, each

        y = LayerNormalization()(Add()([a, b]))

    (the post-norm residual block of the original Transformer and BERT)
    becomes one fused residual layer norm, `y = LN(a + b)` in one pass; when the
    sum is also used elsewhere (pre-norm residual streams) the fused layer
    returns it too (`return_residual=True`). Other layers are cloned with their
    weights; the original model is not modified. Outputs equal the original's
    within floating-point tolerance.

    Left as they are, and listed in the report: subclasses of the stock
    layers, layer norms with `rms_scaling` or over other axes,
    `Attention`, `AdditiveAttention`, nested models
    (cloned; convert them separately), residual adds of broadcast shapes or
    of more than two tensors, and layer norms shared between several calls
    (not fused with their add).

    Args:
      model: a built `keras.Sequential` or functional `keras.Model`
        (subclassed models have no graph to rewrite: ValueError).
      implementation: passed to the fused layers ("auto", "fused",
        "reference").
      fuse_residual: fuse `LayerNormalization(Add([a, b]))` (functional only).
      return_report: also return the `ConversionReport`.

    Returns:
      The converted model, or `(model, report)` with `return_report=True`.
      The report is also logged (logger "tf_fastattn.convert", INFO).

    Example:
      >>> fast = tf_fastattn.convert_model(bert_like_model)
      >>> fast.compile(...); fast.fit(...)
    """
    _loader.check_implementation(implementation)
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            "convert_model: model must be a built Sequential or functional Keras model with known inputs, "
            f"got {type(model).__name__} (built={model.built})"
        )
    if not isinstance(model, keras.Sequential) and not hasattr(model, "_nodes_by_depth"):
        raise ValueError(f"convert_model: a subclassed model ({type(model).__name__}) has no layer graph to rewrite")
    conv = _Converter(implementation, fuse_residual)
    if isinstance(model, keras.Sequential):
        converted = keras.models.clone_model(
            model, clone_function=lambda layer: conv.convert_layer(layer, rank=_input_rank(layer))
        )
    else:
        converted = _convert_functional(model, conv)
    conv.copy_weights()
    logger.info("%s", conv.report)
    return (converted, conv.report) if return_report else converted
