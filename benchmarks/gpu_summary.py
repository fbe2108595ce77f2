"""Prints the short table gpu_run.sh ends with, from its test report and benchmark JSONs."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET


def main(build):
    t = ET.parse(f"{build}/gpu-tests.xml").getroot()
    suite = t if t.tag == "testsuite" else t.find("testsuite")
    n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    print(f"\nGPU tests: {n - f - e - s} passed, {f} failed, {e} errors, {s} skipped")
    att = json.load(open(f"{build}/bench_attention.json"))
    print(f"device: {att['device']}")
    print(f"{'attention (TFLOP/s)':<34}{'tf_fastattn':>12}{'flash':>9}{'cudnn':>9}{'naive':>9}")
    best = {}
    for r in att["rows"]:
        best[(r["dtype"], r["H"], r["T"], r["causal"], r["direction"], r["provider"])] = r["tflops"]
    for (dt, H, T, causal, d, prov), _ in sorted(best.items()):
        if prov != "tf_fastattn" or T not in (2048, 8192) or d == "bwd":
            continue
        get = lambda p: best.get((dt, H, T, causal, d, p), float("nan"))  # noqa: E731
        label = f"{dt} H={H} T={T} {'causal' if causal else 'full'} {d}"
        print(f"{label:<34}{get('tf_fastattn'):>12.1f}{get('FLASH_ATTENTION'):>9.1f}{get('CUDNN_ATTENTION'):>9.1f}"
              f"{get('naive'):>9.1f}")
    ln = json.load(open(f"{build}/bench_layer_norm.json"))
    print(f"{'layer norm (GB/s)':<34}{'fwd':>12}{'bwd':>9}{'copy':>9}{'torch':>9}")
    by = {(r["dtype"], r["cols"], r["provider"]): r["gbps"] for r in ln["rows"]}
    for dt, cols in sorted({(r["dtype"], r["cols"]) for r in ln["rows"]}):
        g = lambda p: by.get((dt, cols, p), float("nan"))  # noqa: E731
        print(f"{dt + ' C=' + str(cols):<34}{g('tf_fastattn fwd'):>12.0f}{g('tf_fastattn bwd'):>9.0f}"
              f"{g('copy'):>9.0f}{g('torch layer_norm(x+r)'):>9.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
