"""The CUDA kernels under the CPU emulator (csrc/emulation), against the NumPy
references with the accuracy criterion.

The emulator stands in for the CUDA driver and NVRTC (tf_fastattn/_cuda_emulator.so);
the runtime loads the driver once per process, so the cases run in a worker
process started with the emulator's environment: `run_cases(cases, arch)`
sends them as JSON to `python cuda_emulation.py` and returns one result per
case. In the worker the package's own GPU entry points (_C.attention_fwd_gpu,
..., on host pointers) run the unchanged runtime: variant choice, compile
cache, launch shapes and shared-memory opt-in, with emulated kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def kernel_module_file() -> str | None:
    """The installed tf_fastattn/_C*.so, found without importing the package
    (which imports TensorFlow: seconds per worker)."""
    import glob

    for entry in sys.path:
        found = glob.glob(os.path.join(entry or ".", "tf_fastattn", "_C.*.so"))
        if found:
            return found[0]
    return None


def emulator_path() -> str | None:
    """tf_fastattn/_cuda_emulator.so next to _C, or None where it is not built (not x86-64)."""
    c = kernel_module_file()
    path = os.path.join(os.path.dirname(c), "_cuda_emulator.so") if c else ""
    return path if os.path.exists(path) else None


def cache_dir() -> str:
    """A compile cache per version of the emulation sources: the runtime's cache
    key covers the kernel sources, not the emulator that compiles them."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(ROOT, "csrc", "emulation"))):
        with open(os.path.join(ROOT, "csrc", "emulation", name), "rb") as f:
            h.update(name.encode() + f.read())
    return os.path.join(ROOT, "build", "emulation-cache", h.hexdigest()[:16])


def thread_sanitizer_runtime() -> str | None:
    """GCC's libtsan (preloaded into the worker for kernels built with
    -fsanitize=thread), or None without one."""
    try:
        out = subprocess.run(["g++", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    path = os.path.realpath(out) if out else ""
    return path if os.path.isabs(path) and os.path.exists(path) else None


def environment(arch: int, schedule: str = "random", seed: int = 0, mutation: tuple | None = None,
                cache: str | None = None, thread_sanitizer: bool = False) -> dict:
    emu = emulator_path()
    env = dict(os.environ)
    env.update(
        TF_FASTATTN_CUDA_DRIVER=emu,
        TF_FASTATTN_NVRTC=emu,
        TF_FASTATTN_EMULATED_ARCH=str(arch),
        TF_FASTATTN_EMULATION_SCHEDULE=schedule,
        TF_FASTATTN_EMULATION_SEED=str(seed),
        TF_FASTATTN_CACHE_DIR=cache or cache_dir(),
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.pop("TF_FASTATTN_ATTENTION_FAMILY", None)
    env.pop("TF_FASTATTN_EMULATION_MUTATION", None)
    if mutation:
        env["TF_FASTATTN_EMULATION_MUTATION"] = "\n".join(mutation)
    if thread_sanitizer:
        # OS threads per GPU thread, kernels instrumented; the first race ends
        # the worker with exit code 66 and the report on stderr.
        env.update(
            TF_FASTATTN_EMULATION_SCHEDULE="threads",
            TF_FASTATTN_EMULATION_CXXFLAGS="-fsanitize=thread -g",
            TF_FASTATTN_CACHE_DIR=(cache or cache_dir()) + "-tsan",
            LD_PRELOAD=thread_sanitizer_runtime(),
            TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0",
        )
    return env


def default_workers() -> int:
    """Emulated workers to run at once: one per CPU, at most 2 (the emulator
    runs a launch on the calling thread, so one worker keeps one core busy)."""
    return min(2, os.cpu_count() or 1)


def run_cases(cases: list[dict], arch: int = 80, schedule: str = "random", seed: int = 0,
              mutation: tuple | None = None, precompile=(), timeout: float = 1500, thread_sanitizer: bool = False,
              workers: int | None = None):
    """Runs `cases` (dicts, see run_attention and run_layer_norm) in emulated
    worker processes; returns their results in order: {"ok", "errors" or "message",
    "digest" (of the outputs' bytes), "seconds"}.

    `mutation` = (file, old, new) plants a bug (the emulator's
    TF_FASTATTN_EMULATION_MUTATION), compiled into a private cache.
    `precompile`: "cases" (the variants the cases use) or "all" (every variant
    of sm_<arch>), compiled first on two threads; () for none.
    `thread_sanitizer`: the threads of a block as OS threads, the kernels built
    with -fsanitize=thread; a race raises RuntimeError with TSan's report.
    `workers`: the cases run in this many workers at once (each takes every
    workers-th case; default: default_workers()), after one worker has
    compiled the variants they use.
    """
    def worker(payload, env):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(payload),
                              capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            at = proc.stderr.find("WARNING: ThreadSanitizer")  # the report, not its tail
            report = proc.stderr[at : at + 4000] if at >= 0 else proc.stderr[-4000:]
            raise RuntimeError(f"the emulated worker failed (exit {proc.returncode}):\n{report}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    workers = max(1, min(workers or default_workers(), len(cases)))
    with tempfile.TemporaryDirectory() as private_cache:
        env = environment(arch, schedule, seed, mutation, private_cache if mutation else None, thread_sanitizer)
        if thread_sanitizer or workers > 1:
            # Compile into the cache first, so that parallel workers do not
            # compile the same variants twice; and a process running under TSan
            # cannot start the compiler (its children crash between fork and
            # exec), so this worker runs without the sanitizer runtime.
            plain = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
            worker({"cases": cases, "precompile": precompile or "cases", "compile_only": True}, plain)
            precompile = ""
        if workers == 1:
            return worker({"cases": cases, "precompile": precompile or ""}, env)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda i: worker({"cases": cases[i::workers], "precompile": ""}, env), range(workers)))
        results = [None] * len(cases)
        for i, part in enumerate(parts):
            results[i::workers] = part
        return results


# ---------------------------------------------------------------------------
# The worker.


def _np_dtypes():
    import ml_dtypes
    import numpy as np

    return {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}


def _poisoned(np, shape, dtype):
    return np.full(shape, np.nan, dtype)


def _make_mask(np, rng, kind, B, N, T, S):
    """None, or a bool mask broadcastable to [B, N, T, S] and its element strides."""
    if kind is None:
        return None
    if kind == "padding":  # [B, 1, 1, S]: per-batch key padding
        lengths = rng.integers(1, S + 1, size=B)
        m = np.arange(S)[None, None, None, :] < lengths[:, None, None, None]
    elif kind == "dense":  # [B, 1, T, S] with fully masked rows
        m = rng.random((B, 1, T, S)) < 0.7
        m[:, :, ::3, :] = False
    elif kind == "heads":  # [1, N, T, S]
        m = rng.random((1, N, T, S)) < 0.5
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    m = np.ascontiguousarray(m)
    strides = [0 if m.shape[i] == 1 else m.strides[i] // m.itemsize for i in range(4)]
    return m, strides


def run_attention(C, case):
    import numpy as np
    from numpy_reference import check_attention

    dt_name = case["dtype"]
    dtype = _np_dtypes()[dt_name]
    B, T, S, N, Nkv, H, Hv = (case[k] for k in ("B", "T", "S", "N", "Nkv", "H", "Hv"))
    causal, rate, seed = case.get("causal", False), case.get("dropout", 0.0), case.get("seed", 1234)
    family = case.get("family", "auto")
    rng = np.random.default_rng(case.get("data_seed", 0))
    strided = case.get("strided", False)

    def tensor(seq, heads, dim, fill=None):
        """[B, seq, heads, dim]; with `strided`, a view of [B, heads, seq, dim] memory."""
        shape = (B, heads, seq, dim) if strided else (B, seq, heads, dim)
        a = rng.standard_normal(shape).astype(dtype) if fill is None else np.full(shape, fill, dtype)
        return a.transpose(0, 2, 1, 3) if strided else a

    def strides(a):
        return [a.strides[i] // a.itemsize for i in range(3)]

    q, k, v, d_o = tensor(T, N, H), tensor(S, Nkv, H), tensor(S, Nkv, Hv), tensor(T, N, Hv)
    if case.get("q_mult"):  # sharper softmax: logits with std ~q_mult
        q = (q * case["q_mult"]).astype(dtype)
    window = tuple(case.get("window", (-1, -1)))
    offset, cap = case.get("offset", 0), case.get("soft_cap", 0.0)
    nan_keys = case.get("nan_keys", 0)  # keys 0 .. nan_keys - 1 hold NaN: no query may see them
    mm = _make_mask(np, rng, case.get("mask"), B, N, T, S)
    mask, mask_strides = mm if mm else (None, [0, 0, 0, 0])
    scale = 1.0 / np.sqrt(H)

    o = tensor(T, N, Hv, np.nan)  # poisoned
    lse = _poisoned(np, (B, N, T), np.float32)
    dq, dk, dv = tensor(T, N, H, np.nan), tensor(S, Nkv, H, np.nan), tensor(S, Nkv, Hv, np.nan)
    shape = C.AttentionShape(B, T, S, N, Nkv, H, Hv)
    ws = np.zeros(C.attention_bwd_workspace_bytes_gpu(shape, dt_name), np.uint8)
    k_in, v_in = k, v
    plants = case.get("plants", ())  # [(tensor "q" or "k", index, value)]: NaN and inf, checked by the NaN rule
    q_clean = q
    if plants:
        q, k_in = q.copy(), k.copy()
        for name, index, value in plants:
            (q if name == "q" else k_in)[tuple(index)] = value
    if nan_keys:
        k_in, v_in = k.copy(), v.copy()
        k_in[:, :nan_keys] = np.nan
        v_in[:, :nan_keys] = np.nan
    common = dict(dtype=dt_name, shape=shape, q=q.ctypes.data, k=k_in.ctypes.data, v=v_in.ctypes.data,
                  mask=mask.ctypes.data if mask is not None else 0, mask_strides=mask_strides, scale=scale,
                  is_causal=causal, dropout_rate=rate, seed=seed, q_strides=strides(q), k_strides=strides(k_in),
                  v_strides=strides(v_in), window_left=window[0], window_right=window[1], query_offset=offset,
                  logits_soft_cap=cap)
    if case.get("seed_device"):
        # The seed in (emulated) device memory; the params' own seed is wrong.
        seed_buffer = np.array([seed], np.uint64)
        common.update(seed=seed + 1, seed_device=seed_buffer.ctypes.data)
    if case.get("offset_device"):
        # The query offset in (emulated) device memory; the params' own is wrong.
        offset_buffer = np.array([offset], np.int32)
        common.update(query_offset=0 if offset else 1, query_offset_device=offset_buffer.ctypes.data)
    fwd = C.AttentionFwdParams(**common, o=o.ctypes.data, lse=lse.ctypes.data, o_strides=strides(o))
    C.attention_fwd_gpu(fwd, 0, family)
    bwd = C.AttentionBwdParams(**common, o=o.ctypes.data, lse=lse.ctypes.data, do_=d_o.ctypes.data,
                  dq=dq.ctypes.data, dk=dk.ctypes.data, dv=dv.ctypes.data, workspace=ws.ctypes.data,
                  o_strides=strides(o), do_strides=strides(d_o), dq_strides=strides(dq), dk_strides=strides(dk),
                  dv_strides=strides(dv))
    C.attention_bwd_gpu(bwd, 0, family)

    if plants:
        return _check_nan_rule(np, case, q, k_in, v, d_o, mask, (o, lse, dq, dk, dv)), (o, lse, dq, dk, dv)
    del q_clean

    # With dropout the CPU kernel drops the same keys: its output with the
    # same seed meets the criterion against the same reference.
    # (Keys holding NaN are checked against the reference with those keys
    # zeroed: no query may see them, so neither may reach any result.)
    also = {}
    band = dict(window=window, query_offset=offset, logits_soft_cap=cap or None)
    if rate > 0:
        also["o (CPU kernel, same seed)"], _ = C.attention_fwd(q, k_in, v_in, mask=mask, scale=scale,
                                                               is_causal=causal, dropout_rate=rate, seed=seed,
                                                               window=window, query_offset=offset,
                                                               logits_soft_cap=cap)
    if nan_keys:
        for out in (o, dq, dk, dv):
            assert np.isfinite(out.astype(np.float64)).all(), "NaN in keys no query may see reached a result"
        k[:, :nan_keys] = 0
        v[:, :nan_keys] = 0
    errors = check_attention(dt_name, q, k, v, d_o, o, lse, dq, dk, dv, mask=mask, scale=scale, is_causal=causal,
                             seed=seed, rate=rate, also_o=also, **band)
    if rate > 0:
        o_cpu = also["o (CPU kernel, same seed)"]
        errors["o_vs_cpu"] = float(np.abs(o.astype(np.float64) - o_cpu.astype(np.float64)).max())
    return errors, (o, lse, dq, dk, dv)


def _check_nan_rule(np, case, q, k, v, d_o, mask, outputs):
    """The NaN rule of tests/test_nan_propagation.py: output rows NaN exactly
    where the float64 reference's are, the others finite and close; every
    gradient entry NaN in the reference NaN here too."""
    from test_nan_propagation import reference

    opts = dict(is_causal=case.get("causal", False), window=tuple(case.get("window", (-1, -1))),
                query_offset=case.get("offset", 0), logits_soft_cap=case.get("soft_cap", 0.0))
    ref = reference(q, k, v, d_o, opts, mask)
    o, lse, dq, dk, dv = (a.astype(np.float64) for a in outputs)
    ref_rows, rows = np.isnan(ref[0]).any(-1), np.isnan(o).any(-1)
    if not ref_rows.any():
        raise AssertionError("the planted values reach no row: not a NaN case")
    if not np.array_equal(rows, ref_rows) or not np.array_equal(np.isnan(o), np.isnan(ref[0])):
        raise AssertionError(f"output rows [b, t, n] NaN here only: {np.argwhere(rows & ~ref_rows).tolist()[:8]}, "
                             f"NaN in the reference only: {np.argwhere(ref_rows & ~rows).tolist()[:8]}")
    if not np.array_equal(np.isnan(lse), np.isnan(ref[1])):
        raise AssertionError("NaN lse rows differ from the reference")
    err = float(np.abs(o[~ref_rows] - ref[0][~ref_rows]).max())
    if not err < (5e-2 if case["dtype"] != "float32" else 1e-4):
        raise AssertionError(f"rows the plants cannot reach: max error {err}")
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:]):
        missing = int((np.isnan(want) & ~np.isnan(got)).sum())
        if missing:
            raise AssertionError(f"{name} misses {missing} NaN entries of the reference")
    return {"o_finite_rows": err}


def run_layer_norm(C, case):
    import numpy as np
    from numpy_reference import check_layer_norm

    dt_name, pdt_name = case["dtype"], case.get("param_dtype", "float32")
    dtype, pdtype = _np_dtypes()[dt_name], _np_dtypes()[pdt_name]
    rows, cols, eps = case["rows"], case["cols"], case.get("epsilon", 1e-3)
    residual = case.get("residual", True)
    norm = case.get("norm", "layer")  # "rms", "rms_scaling": no beta
    kind = {"layer": 0, "rms": 1, "rms_scaling": 2}[norm]
    rng = np.random.default_rng(case.get("data_seed", cols))
    pad = case.get("row_pad", 0)  # > 0: every [rows, cols] tensor is a column slice of [rows, cols + pad]

    def rows_view(a):
        if a is None or not pad:
            return a
        wide = np.full((rows, cols + pad), np.nan, a.dtype)
        wide[:, :cols] = a
        return wide[:, :cols]

    def row_stride(a):
        return a.strides[0] // a.itemsize if a is not None else 0

    x = rows_view((rng.standard_normal((rows, cols)) * 2 + 0.5).astype(dtype))
    plant = case.get("plant")  # (row, col, value): NaN or inf in x, checked by the NaN rule
    if plant is not None:
        x[plant[0], plant[1]] = plant[2]
    r = rows_view(rng.standard_normal((rows, cols)).astype(dtype)) if residual else None
    g = (rng.random(cols) + 0.5).astype(pdtype)
    b = rng.standard_normal(cols).astype(pdtype) if norm == "layer" else None
    stats = np.float64 if dt_name == "float64" else np.float32
    y = rows_view(_poisoned(np, (rows, cols), dtype))
    s = rows_view(_poisoned(np, (rows, cols), dtype)) if residual else None
    mean, rstd = _poisoned(np, rows, stats), _poisoned(np, rows, stats)
    ptr = lambda a: a.ctypes.data if a is not None else 0  # noqa: E731
    C.layer_norm_fwd_gpu(C.LayerNormFwdParams(dtype=dt_name, param_dtype=pdt_name, rows=rows, cols=cols, norm_kind=kind,
                                 epsilon=eps, x=ptr(x), residual=ptr(r), gamma=ptr(g), beta=ptr(b), y=ptr(y),
                                 sum=ptr(s), mean=ptr(mean), rstd=ptr(rstd), x_row_stride=row_stride(x),
                                 residual_row_stride=row_stride(r), y_row_stride=row_stride(y),
                                 sum_row_stride=row_stride(s)))
    dy = rows_view(rng.standard_normal((rows, cols)).astype(dtype))
    dsum = rows_view(rng.standard_normal((rows, cols)).astype(dtype)) if residual else None
    s_in = s if residual else x
    dx = rows_view(_poisoned(np, (rows, cols), dtype))
    dg, db = _poisoned(np, cols, pdtype), (_poisoned(np, cols, pdtype) if b is not None else None)
    ws = np.zeros(C.layer_norm_bwd_workspace_bytes_gpu(rows, cols, dt_name), np.uint8)
    C.layer_norm_bwd_gpu(C.LayerNormBwdParams(dtype=dt_name, param_dtype=pdt_name, rows=rows, cols=cols, norm_kind=kind,
                                 dy=ptr(dy), dsum=ptr(dsum), sum=ptr(s_in), gamma=ptr(g), mean=ptr(mean),
                                 rstd=ptr(rstd), dx=ptr(dx), dgamma=ptr(dg), dbeta=ptr(db), workspace=ptr(ws),
                                 dy_row_stride=row_stride(dy), dsum_row_stride=row_stride(dsum),
                                 sum_row_stride=row_stride(s_in), dx_row_stride=row_stride(dx)))

    b_ref = b if b is not None else np.zeros(cols, pdtype)
    if plant is not None:
        return _check_layer_norm_plant(np, case, x, r, g, b_ref, eps, y, dy, dsum, dx, dg, db), (y, dx, dg)
    errors = check_layer_norm(dt_name, pdt_name, x, r, g, b_ref, eps, y, s, mean, rstd, dy, dsum, dx, dg, db, norm=norm)
    return errors, (y, dx, dg, mean, rstd) + ((db,) if b is not None else ()) + ((s,) if residual else ())


def _check_layer_norm_plant(np, case, x, r, g, b, eps, y, dy, dsum, dx, dg, db):
    """The NaN rule for a NaN or inf planted in x: the planted row's outputs,
    statistics and dx all NaN (inf - inf for inf), dgamma NaN (a sum over
    every row), every other row and dbeta finite and near the float64 math."""
    from numpy_reference import layer_norm_bwd, layer_norm_fwd

    row = case["plant"][0]
    norm = case.get("norm", "layer")
    others = np.arange(x.shape[0]) != row
    f64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    xr = f64(x)[others]
    rr = f64(r)[others] if r is not None else np.zeros_like(xr)
    want_y, want_s, _, _ = layer_norm_fwd(xr, rr, f64(g), f64(b), eps, norm=norm)
    want_dx = layer_norm_bwd(want_s, f64(dy)[others], f64(dsum)[others] if dsum is not None else 0.0, f64(g), eps,
                             norm=norm)[0]
    tol = 1e-4 if case["dtype"] in ("float32", "float64") else 5e-2
    for name, got, want in (("y", y, want_y), ("dx", dx, want_dx)):
        got = f64(got)
        if not np.isnan(got[row]).all():
            raise AssertionError(f"{name}: the planted row is not NaN everywhere")
        if not np.isfinite(got[others]).all():
            raise AssertionError(f"{name}: the plant reached another row")
        np.testing.assert_allclose(got[others], want, atol=tol, rtol=tol, err_msg=name)
    if not np.isnan(f64(dg)).all():
        raise AssertionError("dgamma: not NaN everywhere (it sums the planted row)")
    if db is not None:
        np.testing.assert_allclose(f64(db), f64(dy).sum(0), atol=tol * x.shape[0], rtol=tol, err_msg="dbeta")
    return {"other_rows": 0.0}


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def run_case(C, case):
    t0 = time.perf_counter()
    try:
        errors, outputs = (run_attention if case["op"] == "attention" else run_layer_norm)(C, case)
        return {"ok": True, "errors": errors, "digest": _digest(outputs), "seconds": time.perf_counter() - t0}
    except Exception as e:  # reported per case; the test asserts on it
        return {"ok": False, "message": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}


def variants_of(C, cases, arch):
    """The names of the kernel variants the dispatcher picks for `cases` on sm_<arch>."""
    names = []
    for v in C.gpu_variants(arch):
        for c in cases:
            if c["op"] != v["op"] or c["dtype"] != v["dtype"]:
                continue
            if c["op"] == "attention":
                family = c.get("family", "auto")
                if family == "auto":
                    family = C.gpu_attention_family(arch, c["dtype"])
                if v["family"] != family or v["head_dim"] != C.gpu_head_dim_bucket(c["H"], c["Hv"]):
                    continue
            if v["name"] not in names:
                names.append(v["name"])
    return names


def precompile(C, which, cases, arch):
    """Compiles variants into the disk cache on two threads (the compiler
    releases the GIL), so the cases that follow load them from the cache."""
    from concurrent.futures import ThreadPoolExecutor

    names = [v["name"] for v in C.gpu_variants(arch)] if which == "all" else variants_of(C, cases, arch)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: C.gpu_compile(arch, n), names))


def load_kernel_module():
    """tf_fastattn._C alone, without the package (and so without TensorFlow)."""
    import importlib.machinery
    import importlib.util

    origin = kernel_module_file()
    loader = importlib.machinery.ExtensionFileLoader("tf_fastattn._C", origin)
    spec = importlib.util.spec_from_file_location("tf_fastattn._C", origin, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def main():
    sys.path.insert(0, HERE)
    _C = load_kernel_module()

    info = _C.gpu_runtime_info()
    if not info["ok"] or "_cuda_emulator" not in info["driver"]:
        raise SystemExit(f"the emulator is not the driver here: {info}")
    payload = json.loads(sys.stdin.read())
    arch = int(os.environ["TF_FASTATTN_EMULATED_ARCH"])
    if payload["precompile"]:
        precompile(_C, payload["precompile"], payload["cases"], arch)
    if payload.get("compile_only"):
        print(json.dumps([]))
        return
    results = [run_case(_C, c) for c in payload["cases"]]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
