"""A deep copy of a live Keras model that needs no `get_config`.

`copy.deepcopy` of a Keras object normally goes through its `__reduce__`,
which saves the model to a `.keras` file in memory and loads it back: that
needs every layer to be serialisable, gives every seed generator a new seed,
and rebuilds keras-hub models from their hyperparameters (their compiled
state and sampler are lost). `structural_copy` copies the objects themselves
instead: every attribute, variable (with its value), seed state, optimizer
slot and graph node is copied once, and references between them (tied
weights, shared layers) point at the copies as they pointed at the originals.
Compiled `tf.function`s are not copied; Keras makes them again on first use.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import types

import tensorflow as tf
from keras.src.layers.layer import Layer
from keras.src.ops.function import Function
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.saving.keras_saveable import KerasSaveable
from keras.src.utils.tracking import Tracker

_lock = threading.Lock()


def _is_traced_function(value, depth: int = 2) -> bool:
    """A `tf.function`, or a Python function closing over one (Keras'
    train/test/predict functions wrap their `tf.function` in a closure)."""
    if isinstance(value, tf.types.experimental.GenericFunction):
        return True
    if depth == 0 or not isinstance(value, types.FunctionType):
        return False
    for cell in value.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if _is_traced_function(contents, depth - 1):
            return True
    return False


def forget_traced_functions(obj) -> list:
    """Drops the traced functions `obj` (a layer or model) keeps in its
    attributes (`train_function`, `predict_function`, keras-hub's
    `generate_function`...), which Keras and keras-hub rebuild on next use.
    Returns the names dropped."""
    names = [name for name, value in vars(obj).items() if _is_traced_function(value)]
    for name in names:
        setattr(obj, name, None)
    return names


def _refers_to(function, obj) -> bool:
    for cell in function.__closure__ or ():
        try:
            if cell.cell_contents is obj:
                return True
        except ValueError:  # an empty cell
            continue
    return False


def _rebound(function, memo):
    """A copy of a closure (Layer.__new__'s build/quantize wrappers) whose
    captured objects are the copies."""
    cells = []
    for cell in function.__closure__:
        try:
            cells.append(types.CellType(copy.deepcopy(cell.cell_contents, memo)))
        except ValueError:
            cells.append(types.CellType())
    new = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                             tuple(cells))
    new.__kwdefaults__ = function.__kwdefaults__
    new.__qualname__ = function.__qualname__
    new.__dict__.update(copy.deepcopy(function.__dict__, memo))
    return new


# A tf.Module's (Keras layers on TensorFlow are ones) records of the objects
# assigned to its attributes: {name: object} and [TrackableReference(name, ref)].
_TRACKABLE_DEPENDENCIES = ("_self_unconditional_dependency_names", "_self_unconditional_checkpoint_dependencies")


def _without_traced_functions(value):
    if isinstance(value, dict):
        return type(value)((k, v) for k, v in value.items() if not _is_traced_function(v))
    if isinstance(value, list):
        return [r for r in value if not _is_traced_function(getattr(r, "ref", r))]
    return value


def _deepcopy_keras_object(self, memo):
    new = object.__new__(type(self))
    memo[id(self)] = new
    for name, value in self.__dict__.items():
        if _is_traced_function(value):
            value = None  # train_function, predict_function, generate_function...: rebuilt lazily
        elif name in _TRACKABLE_DEPENDENCIES:
            # TensorFlow's trackable bookkeeping lists the traced functions
            # assigned to the object too (generate_function after a
            # generate()): they are dropped there as well.
            value = copy.deepcopy(_without_traced_functions(value), memo)
        elif isinstance(value, types.FunctionType) and _refers_to(value, self):
            value = _rebound(value, memo)
        else:
            value = copy.deepcopy(value, memo)
        new.__dict__[name] = value
    _rekey(new, memo)
    return new


def _rekey(new, memo):
    """Refreshes what Keras keys by object identity, which changed in the copy."""
    if isinstance(new, Function) and isinstance(new.__dict__.get("_nodes"), set):
        # Functional models name their nodes "<id(operation)>_ib-<index>".
        rekeyed = set()
        for key in new._nodes:
            op_id, _, index = key.partition("_ib-")
            op = memo.get(int(op_id)) if op_id.isdigit() else None
            rekeyed.add(f"{id(op)}_ib-{index}" if op is not None else key)
        new._nodes = rekeyed
    if isinstance(new, BaseOptimizer) and new.__dict__.get("_trainable_variables_indices"):
        # Optimizers find a variable's slots by its identity.
        new._trainable_variables_indices = {
            new._var_key(variable): i for i, variable in enumerate(new._trainable_variables)
        }


def _deepcopy_tracker(self, memo):
    new = object.__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    # The tracker remembers what it stored by id(): the copies' ids.
    if isinstance(getattr(new, "stored_ids", None), dict) and isinstance(getattr(new, "config", None), dict):
        new.stored_ids = {
            store: {id(x) for x in new.config[store][1]} for store in new.stored_ids if store in new.config
        }
    return new


def _shared(self, memo):
    return self


def _with_subclasses(cls):
    found, todo = [], [cls]
    while todo:
        klass = todo.pop()
        if klass not in found:
            found.append(klass)
            todo.extend(klass.__subclasses__())
    return found


@contextlib.contextmanager
def _structural_deepcopy_hooks():
    # Python's deepcopy asks a class for __deepcopy__; these are installed on
    # the Keras base classes for the duration of one copy, under a lock.
    hooks = {KerasSaveable: _deepcopy_keras_object, Tracker: _deepcopy_tracker}
    # Process-wide objects that models refer to, not state of the model: the
    # distribution strategy (optimizers, variables). Some strategy classes
    # define a __deepcopy__ of their own (the default strategy's refuses), so
    # each class of the hierarchy gets the hook.
    for base in (tf.distribute.Strategy, tf.distribute.StrategyExtended):
        for cls in _with_subclasses(base.__mro__[-2]):
            hooks[cls] = _shared
    with _lock:
        saved = {cls: cls.__dict__.get("__deepcopy__") for cls in hooks}
        saved_module_copier = copy._deepcopy_dispatch.get(types.ModuleType)
        for cls, hook in hooks.items():
            cls.__deepcopy__ = hook
        # Modules (seed generators keep the backend module) are shared too.
        copy._deepcopy_dispatch[types.ModuleType] = copy._deepcopy_atomic
        try:
            yield
        finally:
            for cls, original in saved.items():
                if original is None:
                    del cls.__deepcopy__
                else:
                    cls.__deepcopy__ = original
            if saved_module_copier is None:
                del copy._deepcopy_dispatch[types.ModuleType]
            else:
                copy._deepcopy_dispatch[types.ModuleType] = saved_module_copier


def structural_copy(model):
    """A deep copy of `model` (any Keras layer or model), object by object."""
    if not isinstance(model, Layer):
        raise TypeError(f"structural_copy: expected a Keras layer or model, got {type(model).__name__}")
    with _structural_deepcopy_hooks():
        return copy.deepcopy(model)
