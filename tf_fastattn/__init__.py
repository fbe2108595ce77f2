"""tf_fastattn: fused, exact, memory-lean attention and residual layer norm for
TensorFlow and Keras, as custom ops with CPU and CUDA kernels."""

__version__ = "0.1.0"

import contextlib as _contextlib
import os as _os
import sys as _sys


@_contextlib.contextmanager
def _quiet_cli_start():
    """`python -m tf_fastattn` hides TensorFlow's start-up log lines (written
    to file descriptor 2 while TensorFlow loads, before its log level applies)
    unless --verbose is given or TF_CPP_MIN_LOG_LEVEL is set. Python runs a
    package's __init__ with sys.argv[0] == "-m" while it locates __main__."""
    if _sys.argv[:1] != ["-m"] or "--verbose" in _sys.argv or "TF_CPP_MIN_LOG_LEVEL" in _os.environ:
        yield
        return
    _os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    _sys.stderr.flush()
    saved, devnull = _os.dup(2), _os.open(_os.devnull, _os.O_WRONLY)
    _os.dup2(devnull, 2)
    try:
        yield
    finally:
        _os.dup2(saved, 2)
        _os.close(saved)
        _os.close(devnull)


from tf_fastattn import _env

_env.check_flags()  # a boolean variable set to another word is refused here, by name

try:
    with _quiet_cli_start():
        import tensorflow as _tf  # noqa: F401
except ImportError:
    # Without TensorFlow only the kernel module tf_fastattn._C is usable (the
    # GPU test machines run the kernels through it with PyTorch tensors).
    __all__ = ["__version__"]
else:
    from tf_fastattn import _loader
    from tf_fastattn._loader import build_info
    from tf_fastattn.attention import dot_product_attention
    from tf_fastattn.convert import convert_model
    from tf_fastattn.layer_norm import layer_norm, rms_norm
    from tf_fastattn.patch import patch_keras, unpatch_keras

    # Registers the layers with Keras, so a .keras file holding them loads
    # after `import tf_fastattn` alone.
    from tf_fastattn import layers  # noqa: E402

    # Load the op library at import: a SavedModel containing the ops can only
    # be restored once they are registered, and `import tf_fastattn` is what
    # users do.
    _loader.state()
    _loader.check_cpu_isa_env()

    __all__ = [
        "build_info",
        "convert_model",
        "dot_product_attention",
        "layer_norm",
        "layers",
        "patch_keras",
        "rms_norm",
        "unpatch_keras",
        "__version__",
    ]
