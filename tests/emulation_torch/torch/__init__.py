"""A host-memory stand-in for the few PyTorch calls tests/gpu makes, so that
those tests run against the CUDA emulator on a machine without a GPU or
PyTorch (tests/test_cuda_emulated.py puts this folder first on PYTHONPATH in
a worker whose CUDA driver and NVRTC are the emulator's; "device" pointers
are then host pointers). Tensors are NumPy arrays (bfloat16 from ml_dtypes);
only what tests/gpu uses exists, anything else raises AttributeError.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np


class dtype:  # noqa: N801 (PyTorch's spelling)
    def __init__(self, name, np_type):
        self.name, self.np = name, np.dtype(np_type)

    def __repr__(self):
        return f"torch.{self.name}"


float16 = dtype("float16", np.float16)
bfloat16 = dtype("bfloat16", ml_dtypes.bfloat16)
float32 = dtype("float32", np.float32)
float64 = dtype("float64", np.float64)
uint8 = dtype("uint8", np.uint8)
int32 = dtype("int32", np.int32)
int64 = dtype("int64", np.int64)
bool_ = dtype("bool", np.bool_)
_BY_NP = {t.np: t for t in (float16, bfloat16, float32, float64, uint8, int32, int64, bool_)}


def _unwrap(x):
    return x.a if isinstance(x, Tensor) else x


class Tensor:
    def __init__(self, a):
        self.a = np.ascontiguousarray(a) if isinstance(a, np.ndarray) else np.asarray(a)

    # Metadata.
    @property
    def dtype(self):
        return _BY_NP[self.a.dtype]

    @property
    def shape(self):
        return self.a.shape

    @property
    def device(self):
        return "cuda"

    def stride(self, i):
        return self.a.strides[i] // self.a.itemsize

    def numel(self):
        return self.a.size

    def data_ptr(self):
        return self.a.ctypes.data

    # Conversions (the device is the host).
    def to(self, t):
        return Tensor(self.a.astype(t.np))

    def float(self):
        return self.to(float32)

    def double(self):
        return self.to(float64)

    def cpu(self):
        return self

    def cuda(self):
        return self

    def clone(self):
        return Tensor(self.a.copy())

    def detach(self):
        return self

    def numpy(self):
        return self.a

    def item(self):
        return self.a.item()

    # Math.
    def abs(self):
        return Tensor(np.abs(self.a))

    def max(self):
        return Tensor(self.a.max())

    def all(self):
        return Tensor(self.a.all())

    def __bool__(self):
        return bool(self.a)

    def __getitem__(self, i):
        return Tensor(self.a[i])

    def __setitem__(self, i, value):
        self.a[i] = _unwrap(value)

    def _op(self, other, f):
        r = f(self.a, _unwrap(other))
        return Tensor(r.astype(self.a.dtype) if self.a.dtype != np.bool_ and r.dtype != np.bool_ else r)

    def __add__(self, o):
        return self._op(o, np.add)

    __radd__ = __add__

    def __sub__(self, o):
        return self._op(o, np.subtract)

    def __mul__(self, o):
        return self._op(o, np.multiply)

    __rmul__ = __mul__

    def __gt__(self, o):
        return Tensor(self.a > _unwrap(o))


class Generator:
    def __init__(self, device=None):
        self.rng = np.random.default_rng(0)

    def manual_seed(self, seed):
        self.rng = np.random.default_rng(seed)
        return self


_default = Generator()


def manual_seed(seed):
    return _default.manual_seed(seed)


def _shape(size):
    return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size)


def randn(*size, device=None, generator=None, dtype=float32):
    return Tensor((generator or _default).rng.standard_normal(_shape(size)).astype(dtype.np))


def rand(*size, device=None, generator=None, dtype=float32):
    return Tensor((generator or _default).rng.random(_shape(size)).astype(dtype.np))


def randn_like(t):
    return randn(*t.shape, dtype=t.dtype)


def full(size, value, dtype=float32, device=None):
    return Tensor(np.full(_shape((size,)), value, dtype.np))


def full_like(t, value):
    return Tensor(np.full(t.shape, value, t.a.dtype))


def empty(*size, dtype=float32, device=None):
    return Tensor(np.zeros(_shape(size), dtype.np))


def zeros(*size, dtype=float32, device=None):
    return Tensor(np.zeros(_shape(size), dtype.np))


def from_numpy(a):
    return Tensor(a)


def tensor(data, dtype=float32, device=None):
    return Tensor(np.asarray(data, dtype.np))


def equal(a, b):
    return a.shape == b.shape and a.a.tobytes() == b.a.tobytes()


def isfinite(t):
    return Tensor(np.isfinite(t.a.astype(np.float64)))


class _Stream:
    cuda_stream = 0


class cuda:  # noqa: N801 (the torch.cuda namespace)
    @staticmethod
    def is_available():
        return True

    @staticmethod
    def synchronize():
        pass

    @staticmethod
    def current_stream():
        return _Stream()

    @staticmethod
    def get_device_capability():
        arch = int(os.environ.get("TF_FASTATTN_EMULATED_ARCH", "80"))
        return arch // 10, arch % 10
