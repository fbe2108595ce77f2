"""tf_fastattn: fused, exact, memory-lean attention and residual layer norm for
TensorFlow and Keras, as custom ops with CPU and CUDA kernels."""

__version__ = "0.1.0"

try:
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
    from tf_fastattn.layer_norm import layer_norm
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
        "unpatch_keras",
        "__version__",
    ]
