"""GPU kernel runtime: diagnostics, ahead-of-time compilation, the precompile CLI.

The CUDA kernels are compiled by NVRTC for the GPU present on first use and
cached on disk (``$TF_FASTATTN_CACHE_DIR``, default
``~/.cache/tf_fastattn/kernels``). ``python -m tf_fastattn precompile`` warms
that cache ahead of time for given architectures, dtypes and head dims; no GPU
is needed to compile.

Status: the kernels compile for sm_60..sm_90 with NVRTC 12 in CI; they have
not yet been run on a GPU.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tf_fastattn import _C as _C_module

ARCHS = _C_module.GPU_ARCHS  # known_archs() of csrc/runtime/variants.cc


def _C():
    return _C_module


def _point_at_pip_nvrtc() -> None:
    # The C++ runtime looks next to the installed package; a _C built
    # elsewhere (a CMake build directory) finds the pip NVRTC through this.
    if os.environ.get("TF_FASTATTN_NVRTC"):
        return
    for entry in sys.path:
        hits = sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.1[23]")))
        if hits:
            os.environ["TF_FASTATTN_NVRTC"] = hits[0]
            return


def runtime_info() -> dict:
    """What the GPU runtime found: driver, NVRTC (path, version, archs), cache dir, ok/reason."""
    _point_at_pip_nvrtc()
    return _C().gpu_runtime_info()


def variants(arch: int) -> list[dict]:
    """Every kernel variant the dispatchers can choose on sm_<arch> (dicts: name, op, family, dtype, direction, head_dim)."""
    return _C().gpu_variants(arch)


def select_variants(arch: int, dtypes=None, head_dims=None, ops=None) -> list[dict]:
    """The variants for `arch` restricted to `dtypes`, attention `head_dims` buckets and `ops` (None = all)."""
    out = []
    for v in variants(arch):
        if dtypes and v["dtype"] not in dtypes:
            continue
        if ops and v["op"] not in ops:
            continue
        if head_dims and v["op"] == "attention" and v["head_dim"] not in {_bucket(h) for h in head_dims}:
            continue
        out.append(v)
    return out


def _bucket(head_dim: int) -> int:
    bucket = _C_module.gpu_head_dim_bucket(head_dim)
    if bucket == 0:
        raise ValueError(f"head dim must be <= {max(_C_module.GPU_HEAD_DIM_BUCKETS)}, got {head_dim}")
    return bucket


def compile_variants(jobs, threads: int | None = None, use_cache: bool = True) -> list[dict]:
    """Compiles [(arch, variant_name), ...] in a thread pool (NVRTC releases the GIL).

    Returns one dict per job, in order: the _C.gpu_compile result plus `arch`,
    or `arch`, `name` and `error` (the NVRTC log) when compilation failed.
    """
    _point_at_pip_nvrtc()
    C = _C()

    def one(job):
        arch, name = job
        try:
            r = C.gpu_compile(arch, name, use_cache)
        except RuntimeError as e:
            return {"arch": arch, "name": name, "error": str(e)}
        r["arch"] = arch
        return r

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        return list(pool.map(one, jobs))


def resource_table(results: list[dict]) -> str:
    """One line per compiled kernel: arch, variant, kernel, registers, static smem, spills."""
    lines = [f"{'arch':<6}{'variant':<66}{'kernel':<34}{'regs':>5}{'smem':>7}{'spill st/ld':>13}"]
    for r in results:
        if "error" in r:
            lines.append(f"sm_{r['arch']:<3}{r['name']:<66}FAILED")
            continue
        for k in r["kernels"]:
            spill = f"{k['spill_store_bytes']}/{k['spill_load_bytes']}"
            lines.append(
                f"sm_{r['arch']:<3}{r['name']:<66}{k['function']:<34}{k['registers']:>5}"
                f"{k['static_smem_bytes']:>7}{spill:>13}"
            )
    return "\n".join(lines)


def _parse_archs(text: str) -> list[int]:
    """'80', 'sm_80', 'sm_80,sm_90' or '80,90' -> [80, 90]; any other spelling is an argparse error."""
    archs = []
    for part in text.split(","):
        token = part.strip().lower()
        token = token[3:] if token.startswith("sm_") else token
        if not token.isdigit() or int(token) not in ARCHS:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not a supported architecture: expected one of "
                f"{', '.join(str(a) for a in ARCHS)} (or sm_<n>), comma-separated")
        archs.append(int(token))
    return archs


def _int_in(low: int, high: int | None):
    """An argparse type: an integer in [low, high] (high None: no upper bound), else a usage error
    (argparse names the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def precompile_main(argv=None) -> int:
    """`python -m tf_fastattn precompile`: warm the kernel cache. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m tf_fastattn precompile",
        description="Compile tf_fastattn's GPU kernels with NVRTC into the on-disk cache (no GPU needed).",
    )
    parser.add_argument("--arch", type=_parse_archs, action="append", required=True,
                        help="compute capabilities: 80, sm_80 or a comma list such as sm_80,sm_90; repeatable "
                             f"({', '.join(map(str, ARCHS))})")
    parser.add_argument("--dtype", action="append", choices=("float16", "bfloat16", "float32", "float64"),
                        help="repeatable; default: all")
    max_head_dim = max(_C_module.GPU_HEAD_DIM_BUCKETS)
    parser.add_argument("--head-dim", type=_int_in(1, max_head_dim), action="append",
                        help=f"attention head dims in [1, {max_head_dim}]; default: all buckets")
    parser.add_argument("--op", action="append", choices=("attention", "layer_norm"), help="default: both")
    parser.add_argument("-j", "--threads", type=_int_in(1, None), default=None,
                        help="parallel compilations, >= 1 (default: CPUs)")
    parser.add_argument("--report", action="store_true", help="print registers, shared memory and spills")
    args = parser.parse_args(argv)

    archs = list(dict.fromkeys(a for group in args.arch for a in group))
    jobs = [(a, v["name"]) for a in archs for v in select_variants(a, args.dtype, args.head_dim, args.op)]
    if not jobs:
        offered = {}
        for a in archs:
            for v in variants(a):
                offered.setdefault(v["op"], set()).add(v["dtype"])
        kinds = "; ".join(f"{op}: {', '.join(sorted(d))}" for op, d in sorted(offered.items()))
        parser.error(f"the selection (--op {args.op or 'all'}, --dtype {args.dtype or 'all'}, --head-dim "
                     f"{args.head_dim or 'all'}) matches no kernel variant on sm_{', sm_'.join(map(str, archs))}: "
                     f"the variants there are, per op, for dtypes {kinds}")
    info = runtime_info()
    if info["nvrtc"] is None:
        print(f"error: {info['nvrtc_error']}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    results = compile_variants(jobs, args.threads)
    failed = [r for r in results if "error" in r]
    cached = sum(1 for r in results if r.get("from_cache"))
    print(f"compiled {len(results) - len(failed)} of {len(results)} variants ({cached} already cached) in "
          f"{time.perf_counter() - start:.1f} s with {info['nvrtc']} into {info['cache_dir']}")
    if args.report:
        print(resource_table(results))
    for r in failed:
        print(f"FAILED sm_{r['arch']} {r['name']}:\n{r['error']}", file=sys.stderr)
    return 1 if failed else 0
