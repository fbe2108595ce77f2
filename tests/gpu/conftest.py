"""GPU tests: loading _C without TensorFlow, the `gpu` mark, skipping without a GPU.

The GPU machines have PyTorch and no TensorFlow. _C is loaded from TFA_C_PATH
(the .so that benchmarks/gpu_run.sh builds with -DTFA_BUILD_TF_OPS=OFF, which
is not an installed package), or from an installed tf_fastattn (importable
without TensorFlow). Run with --confcutdir=tests/gpu so that tests/conftest.py
(TensorFlow) is not loaded.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import zlib

import pytest

try:
    import torch
except ImportError:  # the test modules skip themselves (gpu_helpers)
    torch = None


def load_C():
    path = os.environ.get("TFA_C_PATH")
    if path:
        spec = importlib.util.spec_from_file_location("_C", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    from tf_fastattn import _C  # noqa: PLC0415

    return _C


def _gpu_reason():
    if torch is None:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        C = load_C()
    except Exception as e:  # noqa: BLE001
        return f"_C not loadable: {e}"
    info = C.gpu_runtime_info()
    return None if info["ok"] else info["reason"]


_REASON = _gpu_reason()


_HERE = pathlib.Path(__file__).resolve().parent


@pytest.hookimpl(trylast=True)  # after -k / -m deselection, so shards split what runs
def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item of the session (also when the whole
    # tests/ tree runs): mark and skip only the ones in this folder.
    ours = [item for item in items if _HERE in pathlib.Path(item.path).resolve().parents]
    shard = os.environ.get("TFA_GPU_TEST_SHARD")  # "i/n": the tests of this folder whose id hashes to i mod n
    if shard:
        i, n = map(int, shard.split("/"))
        drop = {id(item) for item in ours if zlib.crc32(item.nodeid.encode()) % n != i}
        config.hook.pytest_deselected(items=[item for item in items if id(item) in drop])
        items[:] = [item for item in items if id(item) not in drop]
        ours = [item for item in ours if id(item) not in drop]
    skip = pytest.mark.skip(reason=_REASON) if _REASON else None
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if skip:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Draws from the global generator (randn_like) depend on the test alone,
    # not on which tests ran before it in the process (or in its shard).
    if torch is not None:
        torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def C():
    return load_C()
