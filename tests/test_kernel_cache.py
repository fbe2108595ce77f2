"""The on-disk kernel cache runs only the user's own code: created private
(0700, entries 0600), and a directory or entry that another user owns or
could have written is not used (the kernel is compiled in memory, with one
warning on stderr naming the path and why); an unusable directory is
reported the same way. Needs NVRTC (no GPU): the runtime's compile path with
a real cache; each compile takes seconds, so all but the planted entry are
in the slow suite."""

from __future__ import annotations

import os
import stat

import pytest

from tf_fastattn import gpu

_info = gpu.runtime_info()
if _info["nvrtc"] is None:
    if os.environ.get("CI"):
        pytest.fail(f"NVRTC is required in CI: {_info['nvrtc_error']}", pytrace=False)
    pytest.skip(f"NVRTC not found: {_info['nvrtc_error']}", allow_module_level=True)

VARIANT = gpu.select_variants(80, ["float32"], None, ["layer_norm"])[0]["name"]


def _compile():
    return gpu._C().gpu_compile(80, VARIANT, True)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _entries(directory):
    return [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".bin")]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "made" / "kernels"
    monkeypatch.setenv("TF_FASTATTN_CACHE_DIR", str(directory))
    return str(directory)


@pytest.mark.slow
def test_cache_is_created_private_and_reused(cache, capfd):
    assert not _compile()["from_cache"]
    assert _mode(cache) == 0o700 and _mode(os.path.dirname(cache)) == 0o700
    (entry,) = _entries(cache)
    assert _mode(entry) == 0o600
    assert _compile()["from_cache"]
    assert "tf_fastattn: warning" not in capfd.readouterr().err


@pytest.mark.slow
def test_group_writable_directory_is_not_used(cache, capfd):
    os.makedirs(cache)
    os.chmod(cache, 0o775)
    assert not _compile()["from_cache"]
    assert not _compile()["from_cache"]
    assert _entries(cache) == []  # nothing written there either
    err = capfd.readouterr().err
    assert (f"tf_fastattn: warning: not using the kernel cache {cache}: it is writable by its group or by others "
            "(mode 0775)") in err
    assert err.count("not using the kernel cache") == 1  # once per path and reason


def test_entry_others_could_write_is_recompiled_and_replaced(cache, capfd):
    _compile()
    (entry,) = _entries(cache)
    os.chmod(entry, 0o666)  # as if planted: a valid entry that anyone could have written
    result = _compile()
    assert not result["from_cache"]
    assert f"not using the kernel cache {entry}: it is writable by its group or by others (mode 0666)" in \
        capfd.readouterr().err
    assert _mode(entry) == 0o600  # replaced by this process's own compile
    assert _compile()["from_cache"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_entry_owned_by_another_user_is_not_run(cache, capfd):
    _compile()
    (entry,) = _entries(cache)
    os.chown(entry, 65534, 65534)
    assert not _compile()["from_cache"]
    assert f"not using the kernel cache {entry}: it is owned by uid 65534, not by this user (uid 0)" in \
        capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_directory_owned_by_another_user_is_not_used(cache, capfd):
    os.makedirs(cache, mode=0o700)
    os.chown(cache, 65534, 65534)
    assert not _compile()["from_cache"]
    assert f"not using the kernel cache {cache}: it is owned by uid 65534" in capfd.readouterr().err


@pytest.mark.slow
def test_a_file_as_cache_directory_is_reported(tmp_path, monkeypatch, capfd):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    monkeypatch.setenv("TF_FASTATTN_CACHE_DIR", str(path))
    assert not _compile()["from_cache"]
    assert f"not using the kernel cache {path}: it is not a directory" in capfd.readouterr().err


@pytest.mark.slow
def test_a_directory_that_cannot_be_created_is_reported(tmp_path, monkeypatch, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = blocker / "kernels"  # a path through a regular file
    monkeypatch.setenv("TF_FASTATTN_CACHE_DIR", str(target))
    assert not _compile()["from_cache"]
    err = capfd.readouterr().err
    assert f"not using the kernel cache {target}: cannot create directory {target}/: Not a directory" in err


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_directory_is_reported(cache, capfd):
    os.makedirs(cache, mode=0o500)
    assert not _compile()["from_cache"]
    assert f"not using the kernel cache {cache}: cannot write to it: Permission denied" in capfd.readouterr().err


def test_an_unusable_nvrtc_named_by_the_environment_is_reported(monkeypatch):
    monkeypatch.setenv("TF_FASTATTN_NVRTC", "/nonexistent/libnvrtc.so.12")
    info = gpu.runtime_info()
    assert info["nvrtc"] is None
    assert info["nvrtc_error"].startswith("TF_FASTATTN_NVRTC=/nonexistent/libnvrtc.so.12 cannot be used as NVRTC: "
                                          "/nonexistent/libnvrtc.so.12: cannot open shared object file")
    with pytest.raises(Exception, match="TF_FASTATTN_NVRTC=/nonexistent/libnvrtc.so.12 cannot be used"):
        _compile()
    monkeypatch.delenv("TF_FASTATTN_NVRTC")
    assert gpu.runtime_info()["nvrtc"] is not None  # found again without it


def test_an_unusable_driver_named_by_the_environment_is_reported():
    import subprocess
    import sys

    code = "from tf_fastattn import gpu; print(gpu.runtime_info()['reason'])"
    env = dict(os.environ, TF_FASTATTN_CUDA_DRIVER="/nonexistent/libcuda.so", TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("the CUDA driver (/nonexistent/libcuda.so, from TF_FASTATTN_CUDA_DRIVER) could not be loaded: "
            "/nonexistent/libcuda.so: cannot open shared object file") in res.stdout
