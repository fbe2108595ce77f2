"""Every GPU kernel variant compiles with NVRTC 12, on a machine without a GPU.

Compiles all variants for sm_80, and for each of sm_60..sm_90 a set that
covers every family x dtype x direction the dispatcher can choose there (one
head-dim bucket), in parallel; the quick suite compiles a subset of sm_80 (one
per family x dtype x direction, and the hot tensor-core head dims), the rest
is marked slow. Compiles are cached (build/nvrtc-test-cache, or
$TFA_NVRTC_TEST_CACHE) with the runtime's cache key. Writes a registers / shared memory / spills
report (TFA_NVRTC_REPORT, default build/nvrtc_report.txt) and fails on any
compile error and on spills not justified in JUSTIFIED_SPILLS.

Needs `pip install -r requirements-gpu-compile.txt`; skipped without NVRTC
outside CI, a failure in CI.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tf_fastattn import gpu

FULL_ARCH = 80
COVER_ARCHS = (60, 70, 75, 86, 89, 90)
COVER_HEAD_DIM = 128

# Spills ptxas reports that are accepted, keyed by variant: (kernel function,
# the architectures (None: any), a fragment of the variant's name (its dtype
# and head-dim bucket)) -> the reason. Any other spill fails, so a
# justification for one variant covers no other head dim, dtype or
# architecture.
JUSTIFIED_SPILLS = {
    # Unaligned rows (C not a multiple of the vector width) at 4 (16-bit) or 8
    # (float32) vectors per thread, sm_60 only: 128 registers at 512 threads
    # per block, per-element bounds checks; 52 B (16-bit) and 16 B (float32)
    # since the RMS norm kinds (48 B and 12 B before, since the row strides).
    ("tfa_layer_norm_fwd_v4_u", frozenset({60}), "layer_norm.cu[TFA_DTYPE=0]"): "sm_60, odd C, float16",
    ("tfa_layer_norm_fwd_v4_u", frozenset({60}), "layer_norm.cu[TFA_DTYPE=1]"): "sm_60, odd C, bfloat16",
    ("tfa_layer_norm_fwd_v8_u", frozenset({60}), "layer_norm.cu[TFA_DTYPE=2]"): "sm_60, odd C, float32",
    # Head dim 256, float32 SIMT forward: 64 accumulators per thread (16 B
    # where it spilled; none on sm_80 with NVRTC 12.9).
    ("tfa_attention_simt_fwd", None, "TFA_HEAD_DIM=256,"): "head dim 256: 64 output accumulators per thread",
    # Head dim 256, tensor-core backward dK/dV: each of its two passes (dV,
    # then dK) keeps 128 float32 accumulators per thread plus the S^T and dS^T
    # tiles at the 255-register limit; 16 B stored / 40-56 B loaded on sm_80,
    # none on sm_86 and sm_90.
    ("tfa_attention_mma_bwd_dkdv", None, "TFA_HEAD_DIM=256,"): "head dim 256: 128 dK or dV accumulators per pass",
}


def spill_justification(arch, variant, function):
    """The reason a spill of `function` in `variant` on sm_`arch` is accepted, or None."""
    for (fn, archs, fragment), reason in JUSTIFIED_SPILLS.items():
        if fn == function and (archs is None or arch in archs) and fragment in variant:
            return reason
    return None


# Variants whose kernels must not spill at all on sm_80, justified or not.
HOT_HEAD_DIMS = (64, 128)

_info = gpu.runtime_info()
if _info["nvrtc"] is None:
    if os.environ.get("CI"):
        pytest.fail(f"NVRTC is required in CI: {_info['nvrtc_error']}", pytrace=False)
    pytest.skip(f"NVRTC not found: {_info['nvrtc_error']}", allow_module_level=True)


def _jobs():
    jobs = [(FULL_ARCH, v["name"]) for v in gpu.variants(FULL_ARCH)]
    for arch in COVER_ARCHS:
        seen = set()
        for v in gpu.variants(arch):
            key = (v["op"], v["family"], v["dtype"], v["direction"])
            if v["op"] == "attention" and v["head_dim"] != COVER_HEAD_DIM or key in seen:
                continue
            seen.add(key)
            jobs.append((arch, v["name"]))
    return jobs


JOBS = _jobs()


def _quick_jobs():
    """sm_80: one variant per op x family x dtype x direction (head dim 64),
    and every tensor-core variant of the hot head dims (the no-spill check)."""
    seen, jobs = set(), []
    for v in gpu.variants(FULL_ARCH):
        key = (v["op"], v["family"], v["dtype"], v["direction"])
        hot = v["op"] == "attention" and v["family"] == "tensor_core" and v["head_dim"] in HOT_HEAD_DIMS
        if hot or (v["head_dim"] in (0, 64) and key not in seen):
            seen.add(key)
            jobs.append((FULL_ARCH, v["name"]))
    return jobs


QUICK_JOBS = set(_quick_jobs())
# The compiled images and logs are cached on disk like the runtime's kernel
# cache (same key: source, options, arch, NVRTC version), so a rerun only
# compiles what changed.
CACHE_DIR = os.environ.get("TFA_NVRTC_TEST_CACHE", os.path.join("build", "nvrtc-test-cache"))


@pytest.fixture(scope="module")
def compiled(request):
    # The quick set, plus the slow jobs of the test_compiles cases selected.
    wanted = set(QUICK_JOBS)
    for item in request.session.items:
        if getattr(item, "originalname", None) == "test_compiles":
            wanted.add(item.callspec.params["job"])
    jobs = [j for j in JOBS if j in wanted]
    saved = os.environ.get("TF_FASTATTN_CACHE_DIR")
    os.environ["TF_FASTATTN_CACHE_DIR"] = os.path.abspath(CACHE_DIR)
    try:
        start = time.perf_counter()
        results = gpu.compile_variants(jobs, use_cache=True)
        seconds = time.perf_counter() - start
    finally:
        if saved is None:
            os.environ.pop("TF_FASTATTN_CACHE_DIR")
        else:
            os.environ["TF_FASTATTN_CACHE_DIR"] = saved
    cached = sum(1 for r in results if r.get("from_cache"))
    report = os.environ.get("TFA_NVRTC_REPORT", os.path.join("build", "nvrtc_report.txt"))
    os.makedirs(os.path.dirname(report) or ".", exist_ok=True)
    with open(report, "w") as f:
        f.write(f"# {len(jobs)} variants ({cached} from the cache) in {seconds:.1f} s with {_info['nvrtc']}\n")
        f.write(gpu.resource_table(results) + "\n")
    print(f"\n{len(jobs)} variants ({cached} from {CACHE_DIR}) in {seconds:.1f} s; report: {report}")
    return {(r["arch"], r["name"]): r for r in results}


def test_variant_sets_cover_the_dispatcher():
    # sm_80 gets every variant; the other archs one per family x dtype x direction.
    names_80 = {n for a, n in JOBS if a == FULL_ARCH}
    assert names_80 == {v["name"] for v in gpu.variants(FULL_ARCH)}
    for arch in COVER_ARCHS:
        want = {(v["op"], v["family"], v["dtype"], v["direction"]) for v in gpu.variants(arch)}
        got = {(v["op"], v["family"], v["dtype"], v["direction"]) for v in gpu.variants(arch)
               if (arch, v["name"]) in JOBS}
        assert got == want, f"sm_{arch}: missing {want - got}"
    families = {arch: {v["family"] for v in gpu.variants(arch) if v["op"] == "attention"} for arch in COVER_ARCHS}
    assert families[60] == families[70] == families[75] == {"simt"}
    assert families[86] == families[89] == families[90] == {"simt", "tensor_core"}


@pytest.mark.parametrize("job", [pytest.param(j, id=f"sm_{j[0]}-{j[1]}", marks=() if j in QUICK_JOBS else pytest.mark.slow)
                                 for j in JOBS])
def test_compiles(compiled, job):
    r = compiled[job]
    assert "error" not in r, r.get("error")
    assert r["image_bytes"] > 0 and not r["is_ptx"] and r["target"] == f"sm_{job[0]}"
    assert r["kernels"], f"no ptxas resource lines in the log:\n{r['log']}"
    for k in r["kernels"]:
        assert k["registers"] > 0
        assert k["static_smem_bytes"] <= 48 * 1024, f"{k['function']}: static shared memory over 48 KiB"
        if k["spill_store_bytes"] or k["spill_load_bytes"]:
            assert spill_justification(job[0], job[1], k["function"]), (
                f"{k['function']} in {job[1]} spills {k['spill_store_bytes']} B / loads {k['spill_load_bytes']} B "
                f"on sm_{job[0]}: fix it or justify this variant in JUSTIFIED_SPILLS"
            )


def test_hot_variants_do_not_spill(compiled):
    hot = [v["name"] for v in gpu.variants(FULL_ARCH) if v["op"] == "attention" and v["family"] == "tensor_core"
           and v["head_dim"] in HOT_HEAD_DIMS]
    assert {v.split("TFA_BACKWARD=")[1][0] for v in hot} == {"0", "1"}, "forward and backward both checked"
    for name in hot:
        for k in compiled[(FULL_ARCH, name)].get("kernels", []):
            assert not (k["spill_store_bytes"] or k["spill_load_bytes"]), (
                f"{name} {k['function']} spills {k['spill_store_bytes']} B / loads {k['spill_load_bytes']} B on sm_80"
            )


def _first_layer_norm(arch=80):
    return next(v["name"] for v in gpu.variants(arch) if v["op"] == "layer_norm" and v["dtype"] == "float32")


def test_cache_hit_corrupt_entry_and_concurrent_writers(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_FASTATTN_CACHE_DIR", str(tmp_path / "cache"))
    C = gpu._C()
    name = _first_layer_norm()
    first = C.gpu_compile(80, name, True)
    assert not first["from_cache"] and first["cache_file"].startswith(str(tmp_path))
    again = C.gpu_compile(80, name, True)
    assert again["from_cache"] and again["kernels"] == first["kernels"]
    # A truncated entry is detected and recompiled, then rewritten whole.
    with open(first["cache_file"], "r+b") as f:
        f.truncate(os.path.getsize(first["cache_file"]) // 2)
    redone = C.gpu_compile(80, name, True)
    assert not redone["from_cache"]
    assert C.gpu_compile(80, name, True)["from_cache"]
    # Several threads compiling the same entry at once all succeed and leave
    # one complete entry (atomic rename), no temporary files.
    os.remove(first["cache_file"])
    results, errors = [], []

    def worker():
        try:
            results.append(C.gpu_compile(80, name, True))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(first["cache_file"])]
    assert C.gpu_compile(80, name, True)["from_cache"]


def test_cache_key_depends_on_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_FASTATTN_CACHE_DIR", str(tmp_path))
    C = gpu._C()
    name = _first_layer_norm()
    a = C.gpu_compile(80, name, True)
    b = C.gpu_compile(86, name, True)
    assert a["cache_file"] != b["cache_file"] and not b["from_cache"]


def test_unknown_variant_names_the_argument():
    with pytest.raises(ValueError, match="no variant named nope.cu"):
        gpu._C().gpu_compile(80, "nope.cu", False)


def test_precompile_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TF_FASTATTN_CACHE_DIR", str(tmp_path))
    status = gpu.precompile_main(["--arch", "80", "--dtype", "float32", "--op", "layer_norm", "--report"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "compiled 1 of 1 variants" in out and "tfa_layer_norm_bwd_reduce" in out
    assert len(os.listdir(tmp_path)) == 1


@pytest.mark.parametrize("spelling, archs", [("80", [80]), ("sm_80", [80]), ("sm_80,sm_90", [80, 90]),
                                             ("75, SM_86", [75, 86])])
def test_precompile_arch_spellings(spelling, archs):
    assert gpu._parse_archs(spelling) == archs


@pytest.mark.parametrize("spelling", ["sm_81", "compute_80", "80;90", ""])
def test_precompile_rejects_unknown_arch_naming_it(spelling, capsys):
    with pytest.raises(SystemExit) as e:
        gpu.precompile_main(["--arch", spelling])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--arch" in err and "is not a supported architecture: expected one of 60, 70, 75, 80, 86, 89, 90" in err


@pytest.mark.parametrize("args, message", [
    (["--head-dim", "0"], "argument --head-dim: must be in [1, 256], got 0"),
    (["--head-dim", "300"], "argument --head-dim: must be in [1, 256], got 300"),
    (["--head-dim", "x"], "argument --head-dim: expected an integer, got 'x'"),
    (["--threads", "-1"], "argument -j/--threads: must be >= 1, got -1"),
    (["-j", "0"], "argument -j/--threads: must be >= 1, got 0"),
    (["--dtype", "float64", "--op", "attention"],
     "the selection (--op ['attention'], --dtype ['float64'], --head-dim all) matches no kernel variant on sm_80: "
     "the variants there are, per op, for dtypes attention: bfloat16, float16, float32; layer_norm: bfloat16, "
     "float16, float32, float64"),
])
def test_precompile_flags_are_checked(args, message, capsys):
    """Each flag's bad value is a usage error (exit 2) naming it; a selection of nothing says why."""
    with pytest.raises(SystemExit) as e:
        gpu.precompile_main(["--arch", "80", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_spill_justifications_are_keyed_by_variant():
    """A justification covers its variant only: the d256 dK/dV excuse does not
    cover the d128 bucket, the sm_60 layer-norm one not sm_70."""
    bwd = "attention_mma_bwd.cu[TFA_DTYPE=0,TFA_HEAD_DIM={},TFA_BACKWARD=1]"
    assert spill_justification(80, bwd.format(256), "tfa_attention_mma_bwd_dkdv")
    assert not spill_justification(80, bwd.format(128), "tfa_attention_mma_bwd_dkdv")
    assert not spill_justification(80, bwd.format(256), "tfa_attention_mma_bwd_dq")
    assert spill_justification(60, "layer_norm.cu[TFA_DTYPE=0]", "tfa_layer_norm_fwd_v4_u")
    assert not spill_justification(70, "layer_norm.cu[TFA_DTYPE=0]", "tfa_layer_norm_fwd_v4_u")
    assert not spill_justification(60, "layer_norm.cu[TFA_DTYPE=2]", "tfa_layer_norm_fwd_v4_u")
    assert not spill_justification(80, "attention_mma.cu[TFA_DTYPE=0,TFA_HEAD_DIM=256,TFA_BACKWARD=0]",
                                   "tfa_attention_mma_fwd")
