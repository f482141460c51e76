"""The driver at archive scale (issue 13 item 3): planning, resume check and --incremental planning.

Each case runs in its own process (python driver_bench.py --case NAME --n N) so its peak RSS
(VmHWM) is its own; the parent prints one table. No Ray is started: the cases call the planning
steps that `patchcore score`/`extract` run before any work, in the order the jobs run them.

    python benchmarks/driver_bench.py                       # 1M and 10M manifest, 40k shards, 1M incremental
    python benchmarks/driver_bench.py --plain 100000 --shards 2000 --incremental 100000 --listing 10000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARD_SIZE = 256  # jobs' default --shard-size
MIB = 1 << 20


def _peak_mib() -> float:
    """VmHWM (peak resident set) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def synthetic_uri(i: int) -> str:
    """A realistic archive key (~70 characters): line / date / camera / frame."""
    return f"s3://plant-archive/line{i % 7}/2026-{1 + i % 12:02d}-{1 + i % 28:02d}/cam{i % 16:02d}/frame_{i:09d}.png"


def write_manifest(path: Path, n: int) -> None:
    """A .txt manifest of n URIs (unsorted order, as an export would give them), in chunks."""
    chunk = 1_000_000
    with open(path, "w") as f:
        for lo in range(0, n, chunk):
            f.write("\n".join(synthetic_uri(i) for i in range(lo, min(n, lo + chunk))[::-1]))
            f.write("\n")


# --------------------------------------------------------------------------- cases (child process)


def case_plain(n: int, tmp: Path) -> dict:
    """`patchcore score --images MANIFEST.txt`: list, input root, output keys, digest, shards."""
    from jobs.folders import OutputKeys, input_root, inputs_digest, make_shards
    from patchcore_core import storage

    manifest = tmp / f"manifest_{n}.txt"
    if not manifest.exists():
        write_manifest(manifest, n)
    base = _rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    uris = storage.list_images(str(manifest))
    root = input_root(str(manifest), uris)
    keys = OutputKeys(uris, root)  # as jobs.score and jobs.incremental hold them
    digest = inputs_digest(uris)
    shards = make_shards(uris, SHARD_SIZE)
    pending = [s for s in shards if s.index not in set()]  # nothing committed yet
    seconds = time.perf_counter() - t0
    assert len(keys) == n and len(digest) == 64 and len(pending) == -(-n // SHARD_SIZE)
    return {"seconds": seconds, "cpu_s": time.process_time() - c0, "held_mib": _rss_mib() - base,
            "inputs": n}


def _make_committed(out: Path, num_shards: int) -> None:
    """scores/part-NNNNN.parquet + _shards/part-NNNNN.json as OutputFolder.commit_shard writes them."""
    from patchcore_core import storage

    (out / "scores").mkdir(parents=True)
    (out / "_shards").mkdir()
    sample = out / "sample.parquet"
    storage.write_rows(str(sample), {"uri": ("string", [synthetic_uri(i) for i in range(SHARD_SIZE)]),
                                     "score": ("float64", np.zeros(SHARD_SIZE))})
    data = sample.read_bytes()
    sample.unlink()
    for i in range(num_shards):
        name = f"part-{i:05d}"
        (out / "scores" / f"{name}.parquet").write_bytes(data)
        record = {"inputs": SHARD_SIZE, "scored": SHARD_SIZE, "errors": 0, "knn": [],
                  "files": {f"scores/{name}.parquet": {"bytes": len(data), "rows": SHARD_SIZE}}}
        (out / "_shards" / f"{name}.json").write_text(json.dumps(record, sort_keys=True))


def case_resume(num_shards: int, tmp: Path) -> dict:
    """OutputFolder.resume over `num_shards` committed shards (records, sizes, parquet footers)."""
    from jobs.folders import OutputFolder, make_shards, scores_file

    out = tmp / f"resume_{num_shards}"
    if not out.exists():
        _make_committed(out, num_shards)
    n = num_shards * SHARD_SIZE
    uris = [f"/data/{i:09d}.png" for i in range(n)]
    shards = make_shards(uris, SHARD_SIZE)
    base = _rss_mib()
    os.system("sync")
    t0, c0 = time.perf_counter(), time.process_time()
    records, pending = OutputFolder(str(out), {}).resume(shards, scores_file)
    seconds = time.perf_counter() - t0
    assert len(records) == num_shards and not pending, (len(records), len(pending))
    return {"seconds": seconds, "cpu_s": time.process_time() - c0, "held_mib": _rss_mib() - base,
            "inputs": n}


def case_incremental(n: int, tmp: Path) -> dict:
    """--incremental planning: index of n scored keys, listing of n (uri, size, version), 10% new."""
    from jobs import incremental
    from jobs.folders import OutputKeys, input_root, inputs_digest, make_shards

    rng = np.random.default_rng(0)
    listing = [(synthetic_uri(i), 1000 + i % 977, f"{1000 + i % 977}:{1_700_000_000_000_000_000 + i}")
               for i in range(n)]
    listing.sort()
    changed = set(rng.choice(n, n // 10, replace=False).tolist())
    old = [(u, s, v + ("x" if i in changed else "")) for i, (u, s, v) in enumerate(listing)]
    index = np.sort(incremental.version_keys([u for u, _, _ in old], [v for _, _, v in old]))
    del old
    base = _rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    root = input_root("s3://plant-archive", [u for u, _, _ in listing])
    todo = incremental.pending_inputs(listing, index)
    uris = [u for u, _, _ in todo]
    versions = [v for _, _, v in todo]
    keys = OutputKeys(uris, root)  # as jobs.score and jobs.incremental hold them
    shards = make_shards(uris, SHARD_SIZE)
    digest = inputs_digest([f"{u}\n{v}" for u, v in zip(uris, versions)])
    seconds = time.perf_counter() - t0
    assert len(todo) == len(changed) and len(keys) == len(uris) and digest and shards
    return {"seconds": seconds, "cpu_s": time.process_time() - c0, "held_mib": _rss_mib() - base,
            "inputs": n}


def case_listing(n: int, tmp: Path) -> dict:
    """storage.list_image_versions of a local folder of n empty .png files (per-entry cost)."""
    from patchcore_core import storage

    folder = tmp / f"listing_{n}"
    if not folder.exists():
        for d in range(-(-n // 1000)):
            sub = folder / f"d{d:04d}"
            sub.mkdir(parents=True)
            for i in range(min(1000, n - d * 1000)):
                (sub / f"{i:04d}.png").touch()
    base = _rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    listing = storage.list_image_versions(str(folder))
    seconds = time.perf_counter() - t0
    assert len(listing) == n
    return {"seconds": seconds, "cpu_s": time.process_time() - c0, "held_mib": _rss_mib() - base,
            "inputs": n}


CASES = {"plain": case_plain, "resume": case_resume, "incremental": case_incremental,
         "listing": case_listing}
LABELS = {"plain": "plan score from .txt manifest", "resume": "resume check (committed shards)",
          "incremental": "--incremental plan (1 prior index)", "listing": "list_image_versions, local folder"}
TARGETS = {("plain", 10_000_000): "<= 60 s, <= 2048 MiB", ("resume", 40_000): "<= 30 s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--shards", type=int, nargs="*", default=[40_000])
    parser.add_argument("--incremental", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--listing", type=int, nargs="*", default=[100_000])
    parser.add_argument("--tmp", default="", help="work folder (default: a new temporary one)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child: one measurement, one JSON line
        result = CASES[args.case](args.n, Path(args.tmp))
        result["peak_mib"] = _peak_mib()
        print(json.dumps(result))
        return
    tmp = args.tmp or tempfile.mkdtemp(prefix="driver_bench_")
    plan = ([("plain", n) for n in args.plain] + [("resume", n) for n in args.shards]
            + [("incremental", n) for n in args.incremental] + [("listing", n) for n in args.listing])
    print(f"driver bench: shard size {SHARD_SIZE}, {os.cpu_count()} CPUs, work folder {tmp}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}; time s = wall time of the step; CPU s = its "
          "process time (threads summed), less sensitive to other load")
    print("case                                |          N |  time s |  CPU s | peak RSS MiB | held MiB | B/input | target")
    print("------------------------------------|------------|---------|--------|--------------|----------|---------|-------")
    for case, n in plan:
        proc = subprocess.run([sys.executable, __file__, "--case", case, "--n", str(n), "--tmp", tmp],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"{LABELS[case]:<36}| {n:>10} | failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        per_input = r["held_mib"] * MIB / r["inputs"]
        print(f"{LABELS[case]:<36}| {n:>10,} | {r['seconds']:7.1f} | {r['cpu_s']:6.1f} | {r['peak_mib']:12.0f} | "
              f"{r['held_mib']:8.0f} | {per_input:7.0f} | {TARGETS.get((case, n), '')}", flush=True)


if __name__ == "__main__":
    main()
