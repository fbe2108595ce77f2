"""A one-time check of each GPU kernel variant on the GPU present.

The CUDA kernels are verified under emulation on the CPU (README, "Testing
the CUDA kernels without a GPU"); what runs on a real GPU is recorded in
VERIFIED_ON_GPU. Until a variant is recorded there, implementation="auto"
runs it once per process on a small input on the first visible GPU, forward
and backward, and compares it with the reference math by the accuracy
criterion (tf_fastattn/criterion.py): a float64 reference and the same math
in the input dtype on the same GPU. A variant that fails (or raises) is not
used: "auto" falls back to the reference math with a warning naming it.
implementation="fused" is never checked. `build_info()["gpu_self_checks"]`
lists the results.
"""

from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf

# Variants a recorded GPU run verified (keys of variant_key), from
# benchmarks/RESULTS.md; none yet.
VERIFIED_ON_GPU: frozenset[str] = frozenset()

_results: dict[str, dict] = {}
_gpu_arch: list = []  # [arch or None], filled once


def variant_key(op: str, arch: int, dtype: str, head_dim: int | None = None) -> str:
    """'attention sm_90 tensor_core bfloat16 head_dim 128' or 'layer_norm sm_90 float16'."""
    from tf_fastattn import _C

    if op == "attention":
        return f"attention sm_{arch} {_C.gpu_attention_family(arch, dtype)} {dtype} head_dim {_C.gpu_head_dim_bucket(head_dim)}"
    return f"layer_norm sm_{arch} {dtype}"


def results() -> dict:
    """Every self-check run in this process: {variant key: {"ok", "message"}}."""
    return {k: dict(v) for k, v in _results.items()}


def _first_gpu_arch():
    if not _gpu_arch:
        gpus = tf.config.list_physical_devices("GPU")
        arch = None
        if gpus:
            cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
            arch = 10 * cc[0] + cc[1] if cc else None
        _gpu_arch.append(arch)
    return _gpu_arch[0]


def passes(op: str, dtype: str, head_dim: int | None = None) -> bool:
    """Whether "auto" may use the fused kernel of (op, dtype, head_dim): True
    without a GPU, for float64 (it runs on the CPU), for variants recorded in
    VERIFIED_ON_GPU and for those whose self-check on this GPU passed."""
    if dtype not in ("float16", "bfloat16", "float32"):
        return True
    arch = _first_gpu_arch()
    if arch is None:
        return True
    key = variant_key(op, arch, dtype, head_dim)
    if key in VERIFIED_ON_GPU:
        return True
    if key not in _results:
        _results[key] = check(op, dtype, head_dim, device="/GPU:0", key=key)
        if not _results[key]["ok"]:
            warnings.warn(
                f"tf_fastattn: the GPU kernel variant '{key}' failed its self-check on this GPU "
                f"({_results[key]['message']}); implementation='auto' uses the reference math for it",
                RuntimeWarning,
                stacklevel=3,
            )
    return _results[key]["ok"]


def _inputs(op, dtype, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    if op == "attention":
        B, T, S, N, Nkv = 1, 70, 97, 2, 1
        shapes = [(B, T, N, head_dim), (B, S, Nkv, head_dim), (B, S, Nkv, head_dim), (B, T, N, head_dim)]
    else:
        shapes = [(5, 71), (5, 71), (71,), (71,), (5, 71)]
    return [rng.standard_normal(s).astype(np.float64) for s in shapes]


# Each computation returns [out, *gradients], by tf.gradients in a
# tf.function: tf.init_scope (the check runs eagerly even while a model is
# traced) stops gradient tapes, not graph gradients.


@tf.function(autograph=False)
def _fused_attention(q, k, v, d_o):
    from tf_fastattn.attention import fused_attention

    out, _ = fused_attention(q, k, v, is_causal=True)
    return [out] + tf.gradients(out, [q, k, v], grad_ys=d_o)


@tf.function(autograph=False)
def _reference_attention(q, k, v, d_o):
    from tf_fastattn import reference

    out = reference.attention(q, k, v, is_causal=True)
    return [out] + tf.gradients(out, [q, k, v], grad_ys=d_o)


@tf.function(autograph=False)
def _fused_layer_norm(x, r, g, b, dy):
    from tf_fastattn.layer_norm import layer_norm

    y = layer_norm(x, g, b, residual=r, implementation="fused")
    return [y] + tf.gradients(y, [x, g, b], grad_ys=dy)


@tf.function(autograph=False)
def _reference_layer_norm(x, r, g, b, dy):
    from tf_fastattn import reference

    y, _ = reference.layer_norm(x, g, b, residual=r)
    return [y] + tf.gradients(y, [x, g, b], grad_ys=dy)


def check(op: str, dtype: str, head_dim: int | None = None, device: str = "/GPU:0", key: str | None = None,
          fused=None) -> dict:
    """Runs one variant's check on `device` eagerly: {"ok", "message"}.

    `fused` replaces the fused computation (a function of the input tensors
    returning [out, *grads]), to test the check itself."""
    from tf_fastattn import criterion

    key = key or f"{op} {dtype}" + (f" head_dim {head_dim}" if head_dim else "")
    fused = fused or (_fused_attention if op == "attention" else _fused_layer_norm)
    reference = _reference_attention if op == "attention" else _reference_layer_norm
    names = ["out", "dq", "dk", "dv"] if op == "attention" else ["y", "dx", "dgamma", "dbeta"]
    arrays = _inputs(op, dtype, head_dim)
    try:
        with tf.init_scope():
            with tf.device("/CPU:0"):
                ref = reference(*[tf.constant(a) for a in arrays])
            with tf.device(device):
                typed = [tf.constant(a, dtype=dtype) for a in arrays]
                if op == "layer_norm":
                    typed[2:4] = [tf.constant(a, dtype=tf.float32) for a in arrays[2:4]]
                got = fused(*typed)
                naive = reference(*typed)
        worst = []
        for name, g, n, r in zip(names, got, naive, ref):
            criterion.check_close(g.numpy(), n.numpy(), r.numpy(), dtype if name not in ("dgamma", "dbeta")
                                  else "float32", name)
            worst.append(f"{name} {float(np.max(np.abs(g.numpy().astype(np.float64) - r.numpy()))):.2g}")
        return {"ok": True, "message": "max errors: " + ", ".join(worst)}
    except Exception as e:  # a failed launch counts as a failed check
        return {"ok": False, "message": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}


# ---- the XLA custom calls on the GPU ------------------------------------------
# Under XLA on a GPU the ops run as XLA custom calls (csrc/xla_glue), a path no
# GPU has run yet. Before Keras is told that the layers support XLA (and turns
# it on for jit_compile="auto"), that path is checked once per process on the
# first visible GPU, like a kernel variant: attention (bfloat16, causal) and
# residual layer norm (float32), forward and gradients, compiled by XLA,
# against the reference math by the accuracy criterion.


@tf.function(autograph=False, jit_compile=True)
def _xla_attention(q, k, v, d_o):
    from tf_fastattn.attention import fused_attention

    out, _ = fused_attention(q, k, v, is_causal=True)
    return [out] + tf.gradients(out, [q, k, v], grad_ys=d_o)


@tf.function(autograph=False, jit_compile=True)
def _xla_layer_norm(x, r, g, b, dy):
    from tf_fastattn.layer_norm import _fused  # the op itself: no fallback decision inside the check

    y, _ = _fused(x, g, b, r, 1e-3, True, True)
    return [y] + tf.gradients(y, [x, g, b], grad_ys=dy)


_xla_result: list = []  # [{"ok", "message"}], filled once


def xla_check(device: str = "/GPU:0", attention=None, layer_norm=None) -> dict:
    """The XLA custom calls' check on `device`: {"ok", "message"}. `attention`
    and `layer_norm` replace the XLA-compiled computations (to test the check)."""
    messages = []
    for op, dtype, head_dim, fused in (("attention", "bfloat16", 64, attention or _xla_attention),
                                       ("layer_norm", "float32", None, layer_norm or _xla_layer_norm)):
        r = check(op, dtype, head_dim, device=device, fused=fused)
        if not r["ok"]:
            return {"ok": False, "message": f"{op} {dtype} under XLA: {r['message']}"}
        messages.append(f"{op} {dtype} {r['message']}")
    return {"ok": True, "message": "; ".join(messages)}


def xla_gpu_reason() -> str | None:
    """None when the XLA custom calls passed their check on the first visible
    GPU (or no GPU is visible), else why code under XLA gets the reference
    math there. Checked once per process; a failure warns once."""
    if _first_gpu_arch() is None:
        return None
    if not _xla_result:
        _xla_result.append(xla_check("/GPU:0"))
        _results[f"xla custom calls sm_{_first_gpu_arch()}"] = _xla_result[0]
        if not _xla_result[0]["ok"]:
            warnings.warn(f"tf_fastattn: the XLA custom calls failed their self-check on this GPU "
                          f"({_xla_result[0]['message']}); code under XLA uses the reference math and the layers "
                          "leave XLA off", RuntimeWarning, stacklevel=3)
    r = _xla_result[0]
    return None if r["ok"] else f"the XLA custom calls failed their self-check on this GPU: {r['message']}"
