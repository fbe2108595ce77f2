"""tf_fastattn: fused, exact, memory-lean attention and residual layer norm for
TensorFlow and Keras, as custom ops with CPU and CUDA kernels."""

__version__ = "0.1.0"

from tf_fastattn import _loader  # noqa: E402
from tf_fastattn._loader import build_info  # noqa: E402
from tf_fastattn.layer_norm import layer_norm  # noqa: E402
from tf_fastattn.attention import dot_product_attention  # noqa: E402
from tf_fastattn.convert import convert_model  # noqa: E402

# Load the op library at import: a SavedModel containing the ops can only be
# restored once they are registered, and `import tf_fastattn` is what users do.
_loader.state()

__all__ = ["build_info", "convert_model", "dot_product_attention", "layer_norm", "__version__"]
