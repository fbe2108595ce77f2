"""Static performance report of the tensor-core attention kernels, from their
machine code, on a machine without a GPU.

For each variant (architecture, dtype, head dim, direction) the kernels are
compiled by NVRTC (the runtime's own path, `tf_fastattn.gpu.compile_variants`)
and their CUBINs disassembled with `nvdisasm` (PyPI `nvidia-cuda-nvdisasm`,
requirements-gpu-compile.txt). Per kernel function:

* registers (ptxas) and the warps per SM they allow for 128-thread blocks
  (occupancy by registers alone: shared memory and the register allocation
  granularity are not counted);
* HMMA instructions (one per mma.sync m16n8k16);
* SASS instructions per HMMA over the whole function and over its main loop
  (the loop, found by its backward branch, holding the most HMMAs), both
  static: every instantiated branch counts (the forward's four softmax
  variants too), and nested loops that are not unrolled count once, so a loop
  over a run-time trip count inside it reads lower than it issues (`inner
  loops` says how many there are);
* the hot path: the instructions of the cheapest path through the main loop
  (no mask, dropout or soft-cap, an interior tile; it also skips the next
  tile's copies, as the last tile does: 16 to 32 instructions a tile),
  per HMMA, and its shared-memory bytes read per HMMA (per warp: LDS.32 128
  B, LDS.64 256 B, LDS.128 512 B, LDS.U16 64 B, LDSM .x1/.x2/.x4 128/256/512
  B); given only where every HMMA of the loop lies on that path;
* an issue-bound estimate of the main loop's tensor throughput: one warp
  scheduler issues one instruction per cycle, and a m16n8k16 HMMA (4,096
  FLOP) occupies a scheduler's tensor core for 8 cycles on A100 (312 dense
  fp16 TFLOP/s at 1.41 GHz, 108 SMs) and about 6 on H100 SXM through mma.sync
  (about two thirds of its 989 TFLOP/s wgmma peak, 132 SMs at 1.83 GHz): the
  hot path runs at most at peak x min(1, cycles per HMMA / instructions per
  HMMA).
  It ignores latency, memory bandwidth and occupancy; no GPU has confirmed it.

Usage:
    python benchmarks/gpu_static.py [--arch 80 90] [--head-dim 64 128] [--markdown]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

ARCH_PEAK = {  # arch: (name, SMs, GHz, cycles per m16n8k16 HMMA per scheduler)
    80: ("A100", 108, 1.41, 8),
    90: ("H100", 132, 1.83, 6),
}
HMMA_FLOP = 16 * 8 * 16 * 2
SMEM_BYTES = {"LDS.U8": 32, "LDS.S8": 32, "LDS.U16": 64, "LDS.S16": 64, "LDS": 128, "LDS.32": 128, "LDS.64": 256,
              "LDS.128": 512}
LDSM_BYTES = {".M88": 128, ".M88.2": 256, ".M88.4": 512, ".MT88": 128, ".MT88.2": 256, ".MT88.4": 512}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64  # sm_80 and sm_90
BLOCK_WARPS = 4  # kMmaWarps (csrc/kernels/cuda/attention_args.h)

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def nvdisasm() -> str:
    here = os.path.dirname(sys.executable)
    for pattern in ("nvidia/cu*/bin/nvdisasm", "nvidia/cuda_nvdisasm/bin/nvdisasm"):
        for base in sys.path:
            hits = glob.glob(os.path.join(base, pattern))
            if hits:
                return hits[0]
    for path in (os.path.join(here, "nvdisasm"), "/usr/local/cuda/bin/nvdisasm"):
        if os.path.exists(path):
            return path
    raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm (requirements-gpu-compile.txt)")


def parse_functions(sass: str) -> dict:
    """{function: [(address, text)]} with labels as (address, ':label')."""
    functions, current = {}, None
    pending_labels = []
    for line in sass.splitlines():
        m = re.match(r"^\s*\.text\.(\S+):", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        lm = _LABEL.match(line)
        if lm:
            pending_labels.append(lm.group(1))
            continue
        im = _INSTR.match(line)
        if im:
            addr = int(im.group(1), 16)
            for label in pending_labels:
                current.append((addr, ":" + label))
            pending_labels = []
            current.append((addr, im.group(2).strip()))
    return functions


def opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P[T0-9]\s+", "", text)
    return text.split()[0] if text else ""


def smem_bytes(op: str) -> int:
    if op.startswith("LDSM"):
        for suffix, b in sorted(LDSM_BYTES.items(), key=lambda kv: -len(kv[0])):
            if suffix in op:
                return b
        return 128
    if op.startswith("LDS"):
        return SMEM_BYTES.get(op, SMEM_BYTES.get(".".join(op.split(".")[:2]), 128))
    return 0


def analyse(instrs) -> dict:
    labels = {text[1:]: addr for addr, text in instrs if text.startswith(":")}
    code = [(addr, text) for addr, text in instrs if not text.startswith(":")]
    ops = [opcode(t) for _, t in code]
    hmma = sum(op.startswith("HMMA") for op in ops)
    loops = []
    for addr, text in code:
        m = _BRANCH.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] <= addr:
            loops.append((labels[m.group(1)], addr))
    best = None
    for lo, hi in loops:
        body = [opcode(t) for a, t in code if lo <= a <= hi]
        n = sum(op.startswith("HMMA") for op in body)
        if n and (best is None or n > best[2] or (n == best[2] and hi - lo < best[1] - best[0])):
            best = (lo, hi, n, body)
    out = {"instructions": len(code), "hmma": hmma,
           "per_hmma": len(code) / hmma if hmma else None, "loop": None, "hot": None}
    if best:
        lo, hi, n, body = best
        inner = sum(1 for a, b in loops if lo <= a and b <= hi and (a, b) != (lo, hi))
        counts = Counter(body)
        hot = cheapest_path(code, labels, lo, hi)
        # Meaningful only when every HMMA of the loop is on it (the forward's
        # are unconditional); a loop whose products sit in conditional or
        # nested blocks (the backward's) gets none.
        if hot and sum(op.startswith("HMMA") for op in hot) == n:
            out["hot"] = {"instructions": len(hot), "hmma": n, "per_hmma": len(hot) / n,
                          "smem_bytes_per_hmma": sum(smem_bytes(op) for op in hot) / n}
        out["loop"] = {
            "instructions": len(body), "hmma": n, "per_hmma": len(body) / n,
            "smem_bytes_per_hmma": sum(smem_bytes(op) for op in body) / n,
            "inner_loops": inner,
            "global_loads": sum(c for op, c in counts.items() if op.startswith("LDG")),
            "ldgsts": sum(c for op, c in counts.items() if op.startswith("LDGSTS")),
            "ldsm": sum(c for op, c in counts.items() if op.startswith("LDSM")),
            "bar": sum(c for op, c in counts.items() if op.startswith("BAR")),
        }
    return out


def cheapest_path(code, labels, lo, hi):
    """Instructions (as opcodes) on the cheapest path from the loop head at
    address `lo` to its back-edge branch at `hi`, following branches and fall
    throughs inside [lo, hi]: the iteration that skips every conditional
    block (mask and band checks, soft-cap, dropout, scalar copies)."""
    import heapq

    body = [(a, t) for a, t in code if lo <= a <= hi]
    index = {a: i for i, (a, _) in enumerate(body)}
    starts = {0}
    for i, (_, text) in enumerate(body):
        if opcode(text).startswith(("BRA", "EXIT", "RET", "BRX", "JMP")):
            starts.add(i + 1)
            m = _BRANCH.search(text)
            if m and labels.get(m.group(1)) in index:
                starts.add(index[labels[m.group(1)]])
    starts = sorted(i for i in starts if i < len(body))
    ends = starts[1:] + [len(body)]
    block_of = {s: k for k, s in enumerate(starts)}
    succ = []
    for s, e in zip(starts, ends):
        text = body[e - 1][1]
        op = opcode(text)
        guarded = bool(re.match(r"^@!?U?P[0-6]", text))
        nxt = []
        m = _BRANCH.search(text)
        if op.startswith("BRA") and m:
            target = labels.get(m.group(1))
            if target in index and index[target] in block_of and target != lo:
                nxt.append(block_of[index[target]])
            if guarded and e < len(body):
                nxt.append(block_of[e])
        elif op.startswith(("EXIT", "RET", "BRX", "JMP")):
            if guarded and e < len(body):
                nxt.append(block_of[e])
        elif e < len(body):
            nxt.append(block_of[e])
        succ.append(nxt)
    last = len(starts) - 1
    best = {0: ends[0] - starts[0]}
    prev = {0: None}
    heap = [(best[0], 0)]
    while heap:
        d, k = heapq.heappop(heap)
        if d > best.get(k, 1 << 60):
            continue
        for n in succ[k]:
            nd = d + ends[n] - starts[n]
            if nd < best.get(n, 1 << 60):
                best[n], prev[n] = nd, k
                heapq.heappush(heap, (nd, n))
    if last not in best:
        return None
    path, k = [], last
    while k is not None:
        path.append(k)
        k = prev[k]
    return [opcode(body[i][1]) for k in reversed(path) for i in range(starts[k], ends[k])]


def estimate_tflops(arch: int, per_hmma: float) -> float:
    _, sms, ghz, cycles = ARCH_PEAK[arch]
    peak = sms * 4 * ghz * 1e9 * HMMA_FLOP / cycles
    return peak * min(1.0, cycles / per_hmma) / 1e12


def cubin_of(cache_file: str) -> bytes:
    data = open(cache_file, "rb").read()
    return data[data.index(b"\x7fELF"):]


def report(archs, head_dims, dtypes=("float16", "bfloat16")):
    from tf_fastattn import gpu

    tool = nvdisasm()
    jobs = []
    for arch in archs:
        for v in gpu.variants(arch):
            if (v["op"] == "attention" and v["family"] == "tensor_core" and v["head_dim"] in head_dims
                    and v["dtype"] in dtypes):
                jobs.append((arch, v))
    # The compile cache the NVRTC tests use (same key as the runtime's).
    saved = os.environ.get("TF_FASTATTN_CACHE_DIR")
    os.environ["TF_FASTATTN_CACHE_DIR"] = os.path.abspath(os.path.join("build", "nvrtc-test-cache"))
    try:
        results = gpu.compile_variants([(a, v["name"]) for a, v in jobs], use_cache=True)
    finally:
        if saved is None:
            os.environ.pop("TF_FASTATTN_CACHE_DIR")
        else:
            os.environ["TF_FASTATTN_CACHE_DIR"] = saved
    rows = []
    for (arch, v), r in zip(jobs, results):
        if "error" in r:
            raise SystemExit(f"sm_{arch} {v['name']}: {r['error']}")
        regs = {k["function"]: k for k in r["kernels"]}
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin_of(r["cache_file"]))
            f.flush()
            sass = subprocess.run([tool, "-c", f.name], check=True, capture_output=True, text=True).stdout
        for fn, instrs in sorted(parse_functions(sass).items()):
            a = analyse(instrs)
            if not a["hmma"]:
                continue
            k = regs.get(fn, {})
            block_regs = max(k.get("registers", 1), 1) * 32 * BLOCK_WARPS
            warps_by_regs = min(MAX_WARPS_PER_SM, REGS_PER_SM // block_regs * BLOCK_WARPS)
            rows.append(dict(arch=arch, dtype=v["dtype"], head_dim=v["head_dim"], direction=v["direction"],
                             function=fn, registers=k.get("registers"), spills=(k.get("spill_store_bytes", 0),
                                                                               k.get("spill_load_bytes", 0)),
                             warps_per_sm=warps_by_regs, **a))
    return rows


def table(rows, markdown=False) -> str:
    head = ["arch", "dtype", "H", "kernel", "regs", "spill st/ld", "warps/SM", "HMMA", "instr/HMMA (static)",
            "loop instr/HMMA (static)", "hot path instr/HMMA", "hot path smem B/HMMA", "inner loops",
            "est. TFLOP/s"]
    lines = []
    for r in rows:
        loop, hot = r["loop"] or {}, r["hot"] or {}
        est = estimate_tflops(r["arch"], hot["per_hmma"]) if hot else None
        lines.append([f"sm_{r['arch']}", r["dtype"], str(r["head_dim"]), r["function"].replace("tfa_attention_", ""),
                      str(r["registers"]), "{}/{}".format(*r["spills"]), str(r["warps_per_sm"]), str(r["hmma"]),
                      f"{r['per_hmma']:.1f}", f"{loop['per_hmma']:.1f}" if loop else "-",
                      f"{hot['per_hmma']:.1f}" if hot else "-",
                      f"{hot['smem_bytes_per_hmma']:.0f}" if hot else "-", str(loop.get("inner_loops", "-")),
                      f"{est:.0f} ({ARCH_PEAK[r['arch']][0]})" if est else "-"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCH_PEAK))
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    print(table(report(args.arch, args.head_dim), args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
