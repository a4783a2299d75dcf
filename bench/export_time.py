"""Wall time and peak memory to export a source (default: the default model) to each backend (one
process per backend, so peaks don't mix). Leaves the bundle for the other benchmarks.
Usage: python bench/export_time.py --out DIR [--source SOURCE] [--window-size 508] [--chunk 32] [--name export_time]"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import write_json

CHILD = """
import sys, time
from pocketlm.toolchain.export import export_bundle
t = time.perf_counter()
export_bundle(sys.argv[5], sys.argv[1], (sys.argv[2],), sink_size=4, window_size=int(sys.argv[3]), chunk=int(sys.argv[4]))
print('EXPORT_S', time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--window-size", type=int, default=508)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--source", default="default")
    ap.add_argument("--name", default="export_time")
    args = ap.parse_args()
    out = Path(args.out)
    results, parts = {}, {}
    for backend in ("onnx", "executorch"):
        part = out.parent / f"{out.name}.{backend}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(part), backend, str(args.window_size), str(args.chunk), args.source],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        export_s = float(proc.stdout.split("EXPORT_S")[-1])
        manifest = json.loads((part / "manifest.json").read_text())
        size = sum((part / f).stat().st_size for f in manifest["programs"][backend]["files"])
        results[backend] = {"export_s": export_s, "process_wall_s": wall,
                            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
                            "peak_rss_bytes": after.ru_maxrss * 1024, "program_bytes": size}
        parts[backend] = part
        print(backend, results[backend], flush=True)
    merge(parts, out)
    write_json(args.name, {"source": args.source, "cache": {"sink_size": 4, "window_size": args.window_size, "chunk": args.chunk},
                               "results": results, "bundle": str(out),
                               "note": "peak_rss_bytes is the largest child so far (ru_maxrss of RUSAGE_CHILDREN)"})


def merge(parts: dict, out: Path) -> None:
    """One bundle with both programs: the other backends' files and manifest entries join the first."""
    import shutil

    from pocketlm.runtime.bundle import MANIFEST, sha256_file

    first, *_ = parts.values()
    manifest = json.loads((first / MANIFEST).read_text())
    for backend, part in list(parts.items())[1:]:
        m = json.loads((part / MANIFEST).read_text())
        for f in part.iterdir():
            if f.name != MANIFEST and not (first / f.name).exists():
                shutil.move(str(f), first / f.name)
        manifest["programs"][backend] = m["programs"][backend]
        for key in ("golden", "reference"):
            manifest.setdefault(key, m.get(key))
        shutil.rmtree(part)
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(first.iterdir()) if p.name != MANIFEST}
    (first / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    first.rename(out)


if __name__ == "__main__":
    main()
