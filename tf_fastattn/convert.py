"""`tf_fastattn.convert_model`: make a Keras model's attention and layer norms
run the fused ops, wherever they are nested, without rebuilding the model."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import keras

from tf_fastattn import _loader

logger = logging.getLogger("tf_fastattn.convert")


@dataclasses.dataclass
class ConversionReport:
    """What `convert_model` found and did.

    replaced: `(layer path, class name)` for each attention or layer-norm
      layer now running the fused ops.
    fused_residual: `(add layer path, layer norm path)` for each
      `LayerNormalization(Add([a, b]))` that became one fused residual layer norm.
    skipped: `(layer path, reason)` for each attention or layer-norm layer
      (and residual add) left as it was.
    copy: how the model that was converted relates to the one passed in:
      "in place", "copy", or why a copy was impossible.
    """

    replaced: list = dataclasses.field(default_factory=list)
    fused_residual: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    copy: str = "in place"

    def __str__(self):
        lines = [
            f"tf_fastattn.convert_model ({self.copy}): {len(self.replaced)} layers fused, "
            f"{len(self.fused_residual)} residual adds fused, {len(self.skipped)} left as they were"
        ]
        lines += [f"  fused {path} ({kind})" for path, kind in self.replaced]
        lines += [f"  fused add {add} + {ln}" for add, ln in self.fused_residual]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def _path(layer):
    return getattr(layer, "path", None) or layer.name


def _layer_norm_reason(layer, mixin):
    """Why a layer norm (LayerNormalization, RMSNormalization) would not run
    fused, or None: the layer's own rule (`_fused_axis_reason` of its mixin),
    with the input rank from its build."""
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if list(axes) == [-1]:
        rank = 1  # the last axis of any input
    else:
        shapes = list((getattr(layer, "_build_shapes_dict", None) or {}).values())
        rank = len(shapes[0]) if shapes and shapes[0] is not None else None
        if rank is None:
            return f"axis={layer.axis}: cannot tell whether it is the last axis before the layer is built"
    return mixin._fused_axis_reason(layer, rank)


def _attention_axes_reason(layer):
    """Why a MultiHeadAttention would never run fused, or None: the layer's own
    rule (`_fused_axes_reason`), with the query's rank from its build (a rank-3
    input, projected to rank 4, when it is not built yet)."""
    from tf_fastattn.layers.multi_head_attention import FusedMultiHeadAttentionMixin

    query_shape = (getattr(layer, "_build_shapes_dict", None) or {}).get("query_shape")
    projected_rank = len(query_shape) + 1 if query_shape is not None else 4
    return FusedMultiHeadAttentionMixin._fused_axes_reason(layer, projected_rank)


def _why_not_fused(layer):
    """Why an attention or layer-norm instance stays as it is, or None."""
    from tf_fastattn.layers import _switch

    from tf_fastattn.layers.layer_normalization import FusedLayerNormalizationMixin, FusedRMSNormalizationMixin

    reason = _switch.unfused_reason(type(layer))
    if reason is None and isinstance(layer, keras.layers.LayerNormalization):
        reason = _layer_norm_reason(layer, FusedLayerNormalizationMixin)
    if reason is None and isinstance(layer, keras.layers.RMSNormalization):
        reason = _layer_norm_reason(layer, FusedRMSNormalizationMixin)
    if reason is None and isinstance(layer, keras.layers.MultiHeadAttention):
        reason = _attention_axes_reason(layer)
    return reason


def _no_counterpart_reason(layer):
    """Why an attention or norm layer without a fused twin is not fused (for
    the report), or None for layers that are neither."""
    from tf_fastattn.layers import hub

    for cls, reason in hub.unsupported().items():
        if isinstance(layer, cls):
            return f"{type(layer).__name__} {reason}"
    if isinstance(layer, (keras.layers.Attention, keras.layers.AdditiveAttention)):
        return f"{type(layer).__name__} has no fused counterpart"
    name = type(layer).__name__
    if not name.endswith(("Attention", "Norm", "Normalization")) or isinstance(layer, keras.Model):
        return None
    from tf_fastattn.layers import _switch

    # A layer of its own (not a block wrapping attention or norms tf_fastattn fuses).
    inner = layer._flatten_layers(include_self=False, recursive=True)
    if any(_switch.stock_class(type(sub)) is not None for sub in inner):
        return None
    return f"{name} has no fused counterpart (an attention or norm layer tf_fastattn does not know)"


def _convert_layers(model, implementation, report):
    from tf_fastattn.layers import _switch

    layers = model._flatten_layers(include_self=True, recursive=True)
    for layer in layers:
        if _switch.stock_class(type(layer)) is None:
            reason = _no_counterpart_reason(layer)
            if reason is not None:
                report.skipped.append((_path(layer), reason))
            continue
        if _switch.is_fused(layer):
            report.skipped.append((_path(layer), f"already fused ({type(layer).__name__})"))
            continue
        reason = _why_not_fused(layer)
        if reason is not None:
            report.skipped.append((_path(layer), reason))
            continue
        _switch.switch_to_fused(layer, implementation)
        report.replaced.append((_path(layer), type(layer).__name__))
    if report.replaced:
        # A model converted in place after it ran holds functions traced with
        # the stock layers: they must be traced again.
        from tf_fastattn._copy import forget_traced_functions

        for layer in layers:
            forget_traced_functions(layer)


def _is_plain_functional(model):
    # Only a plain functional model can be rebuilt from its graph; a subclass
    # (a keras-hub task, say) has an __init__ and methods of its own.
    return type(model) in (keras.Model, keras.src.models.functional.Functional)


def _residual_layer_norm_pairs(model):
    """Finds `LayerNormalization(Add([a, b]))` nodes of a functional graph.

    Returns ({id(add node): (ln node, whether the sum is also used elsewhere)},
    [(add path, reason)] for the pairs that cannot be fused).
    """
    from tf_fastattn.layers import _switch

    nodes = [node for depth in model._nodes_by_depth.values() for node in depth]
    consumers = {}
    calls = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for t in node.input_tensors:
            consumers.setdefault(id(t), []).append(node)
    outputs = {id(t) for t in model.outputs}

    pairs, skipped = {}, []
    for ln_node in nodes:
        ln = ln_node.operation
        if _switch.original_class(type(ln)) is not keras.layers.LayerNormalization or len(ln_node.input_tensors) != 1:
            continue
        (s,) = ln_node.input_tensors
        add, node_index, _ = s._keras_history
        if type(add) is not keras.layers.Add:
            continue
        add_node = add._inbound_nodes[node_index]
        a_b = add_node.input_tensors
        if len(a_b) != 2 or tuple(a_b[0].shape) != tuple(a_b[1].shape):
            skipped.append((_path(add), f"Add of {len(a_b)} tensors or of broadcast shapes: not fused into {ln.name}"))
        elif not _switch.is_fused(ln):
            skipped.append((_path(add), f"not fused with {ln.name}, which is not fused"))
        elif calls[id(ln)] > 1:
            skipped.append((_path(add), f"{ln.name} is called more than once (shared): residual add not fused"))
        else:
            other_uses = len(consumers.get(id(s), [])) > 1 or id(s) in outputs
            pairs[id(add_node)] = (ln_node, other_uses)
    return pairs, skipped


def _fuse_residual_adds(model, pairs, implementation, report):
    """A new functional model computing `model` with each Add + LayerNormalization
    pair as one fused layer norm. Layers are the model's own (not clones)."""
    from tf_fastattn.layers import LayerNormalization

    done = set()  # ids of LN nodes already computed with their Add
    tensors = {id(t): t for t in model.inputs}
    nodes_by_depth = {depth: list(nodes) for depth, nodes in model._nodes_by_depth.items()}
    # `model` is a copy whose graph is replaced: its layers forget their old
    # calls, so that each layer's first node is the one made here (Keras
    # reads a layer's output structure from its first node, and a fused
    # residual norm returns two tensors where the norm returned one).
    for operation in model._operations:
        operation._outbound_nodes = []
        if not isinstance(operation, keras.layers.InputLayer):
            operation._inbound_nodes = []
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if node.is_input or id(node) in done:
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            if id(node) in pairs:
                ln_node, keep_sum = pairs[id(node)]
                ln = ln_node.operation
                # The public layer takes [x, residual] and serialises as
                # tf_fastattn>LayerNormalization with return_residual.
                ln.__class__ = LayerNormalization
                ln._init_implementation(implementation)
                ln.return_residual = keep_sum
                report.fused_residual.append((_path(node.operation), _path(ln)))
                inputs = args[0] if args else kwargs["inputs"]
                result = ln(list(inputs))
                y, s = result if keep_sum else (result, None)
                tensors[id(ln_node.outputs[0])] = y
                if keep_sum:
                    tensors[id(node.outputs[0])] = s
                done.add(id(ln_node))
                continue
            outputs = node.operation(*args, **kwargs)
            for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
                tensors[id(old)] = new

    outputs = keras.tree.pack_sequence_as(model._outputs_struct, [tensors[id(t)] for t in model.outputs])
    fused = keras.Model(model._inputs_struct, outputs, name=model.name)
    if getattr(model, "compiled", False):
        fused.compile_from_config(model.get_compile_config())
    return fused


def _copy(model):
    """A deep copy of `model` (`tf_fastattn._copy.structural_copy`), or None and why it could not be made."""
    from tf_fastattn._copy import structural_copy

    try:
        return structural_copy(model), None
    except Exception as e:  # noqa: BLE001 - any failure means: no copy
        return None, f"{type(e).__name__}: {e}"


def convert_model(
    model,
    *,
    inplace: bool = False,
    implementation: str = "auto",
    fuse_residual: bool = True,
    return_report: bool = False,
):
    """Makes every Keras attention and layer norm in `model` run the fused ops.

    Walks every layer, however deeply nested (inside custom layers, keras-hub
    backbones and tasks, Sequential, functional and subclassed models), and
    switches each instance of `keras.layers.MultiHeadAttention`,
    `keras.layers.GroupQueryAttention` and `keras.layers.LayerNormalization`
    (over the last axis) - and of their subclasses, such as keras-hub's
    `CachedMultiHeadAttention` - to a fused subclass of its own class. Nothing
    is cloned or rebuilt: weights, tied and shared variables, seed generators,
    names, the model's class and methods (`generate()`), inputs (dicts stay
    dicts), outputs and compiled state are those of the model converted, and
    its config and saved files are unchanged (they load without tf_fastattn,
    as the stock layers). Outputs equal the original's within floating-point
    tolerance; attention dropout draws its masks inside the fused op, so they
    differ from Keras' (same rate, same seed generator, reproducible).

    In a plain functional model (a `keras.Model(inputs, outputs)`), each

        y = LayerNormalization()(Add()([a, b]))

    (post-norm residual blocks) also becomes one fused residual layer norm,
    `y = LN(a + b)` in one pass, and the sum is returned too where it is used
    elsewhere (pre-norm residual streams). That rewrites the graph, so it
    happens only on a copy (`inplace=False`): the result is a new functional
    model over the copy's layers, whose fused layer norms serialise as
    `tf_fastattn>LayerNormalization`.

    keras-hub's decoder LLM layers are switched the same way: the attention
    of Llama, Mistral, Mixtral, Phi-3, Qwen (-MoE), Qwen3 (-MoE), SmolLM3,
    GPT-NeoX and Gemma 1-3, and their RMS norms, keeping each layer's own
    semantics (scale, soft-cap, sliding window, dropout, masked rows:
    `tf_fastattn.layers.hub`), in training and in cached decoding
    (`generate()`); `keras.layers.RMSNormalization` and
    `LayerNormalization(rms_scaling=True)` run the fused RMS norms.

    Left as they are, each listed in the report with the reason: subclasses
    that override the methods the fused path replaces, layer norms over other
    axes, multi-head attention over axes other than the sequence (the layers'
    own rules decide), `Attention` and `AdditiveAttention`, keras-hub
    attention with position biases or sinks (Falcon, Bloom, T5, GPT-OSS),
    other layers named like attention or norms, residual adds that cannot be
    fused.

    Args:
      model: a Keras model or layer.
      inplace: convert `model` itself. With False (default) a deep copy is
        made first, object by object (no `get_config` needed: variables,
        seed states, optimizer slots, compiled state and the model's own
        attributes are copied, tied weights stay tied); if no copy can be
        made, `model` itself is converted, with a warning saying why.
      implementation: passed to the fused layers ("auto", "fused", "reference").
      fuse_residual: fuse `LayerNormalization(Add([a, b]))` (plain functional
        models, not in place).
      return_report: also return the `ConversionReport`.

    Returns:
      The converted model, or `(model, report)` with `return_report=True`.
      The report is also logged (logger "tf_fastattn.convert", INFO).

    Example:
      >>> classifier = keras_hub.models.BertTextClassifier.from_preset(...)
      >>> classifier = tf_fastattn.convert_model(classifier)
      >>> classifier.fit(dataset)       # same model, same dict inputs, fused
    """
    _loader.check_implementation(implementation)
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"convert_model: model must be a Keras model or layer, got {type(model).__name__}")
    report = ConversionReport()
    if not inplace:
        copied, why_not = _copy(model)
        if copied is None:
            report.copy = f"in place: no copy could be made ({why_not})"
            warnings.warn(
                f"tf_fastattn.convert_model: could not copy {model.name} ({why_not}); converting it in place",
                stacklevel=2,
            )
        else:
            model, report.copy = copied, "copy"
    _convert_layers(model, implementation, report)
    if fuse_residual and hasattr(model, "_nodes_by_depth"):
        pairs, skipped = _residual_layer_norm_pairs(model)
        if pairs and report.copy != "copy":
            skipped += [(_path(node.operation), "residual add not fused: in-place conversion keeps the graph")
                        for node in _add_nodes(model, pairs)]
        elif pairs and not _is_plain_functional(model):
            skipped += [(_path(node.operation), f"residual add not fused: {type(model).__name__} is a "
                         "subclass of the functional Model; its graph is kept")
                        for node in _add_nodes(model, pairs)]
        elif pairs:
            model = _fuse_residual_adds(model, pairs, implementation, report)
        report.skipped += skipped
    logger.info("%s", report)
    return (model, report) if return_report else model


def _add_nodes(model, pairs):
    return [node for depth in model._nodes_by_depth.values() for node in depth if id(node) in pairs]
