"""--incremental planning over a 1M-object archive: the old listing (storage.list_image_versions,
one fsspec `find`, then filter) against the streamed one (incremental.plan_inputs).

Archive: a local folder of N empty .png files (1000 folders of 1000; created once, reused), the
listing a nightly run does on a plain folder. Each (method, night) runs in its own process; its
peak RSS is measured from the moment planning starts (VmHWM reset through /proc/self/clear_refs
after imports and after loading the prior index), so "peak MiB" is what planning adds to the driver.

Nights: "first" (empty index: every object is pending) and "nightly" (an index of every object but
1%: the common case, 1% pending). Optional: --s3 N objects on a local moto S3 server (slow to fill).

    python benchmarks/listing_bench.py                      # 1M objects, writes results/listing.txt
    python benchmarks/listing_bench.py --n 100000 --s3 20000 --out ''
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1 << 20
NEW_EVERY = 100  # the nightly index lacks every 100th object: 1% pending


def _status(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_folder(folder: Path, n: int) -> None:
    """n empty .png files in folders of 1000 (skipped when a complete one is there)."""
    done = folder / f"_complete_{n}"
    if done.exists():
        return
    for d in range(-(-n // 1000)):
        sub = folder / f"d{d:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(min(1000, n - d * 1000)):
            os.close(os.open(sub / f"{i:04d}.png", os.O_CREAT | os.O_WRONLY, 0o644))
    done.touch()


def fill_s3(n: int) -> str:
    """A moto S3 server on loopback holding n tiny objects; returns the prefix URI."""
    import boto3
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address  # the port the OS chose
    os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for i in range(n):
        client.put_object(Bucket="bench", Key=f"archive/d{i // 1000:04d}/{i % 1000:04d}.png", Body=b"")
    return "s3://bench/archive"


def write_index(images: str, path: Path) -> int:
    """The nightly index (every object but each NEW_EVERY-th) as .npy; returns its length."""
    from jobs import incremental
    from patchcore_core import storage

    keys = [incremental.version_keys(c["uri"], c["version"]) for c in storage.iter_image_versions(images)]
    every = np.concatenate(keys)
    index = np.sort(every[np.arange(len(every)) % NEW_EVERY != 0])
    np.save(path, index)
    return len(index)


def plan_old(images: str, index: np.ndarray) -> tuple[int, int]:
    """The previous planner: the whole listing as Python tuples (fsspec find), then filtered."""
    from jobs import incremental
    from jobs.folders import input_root
    from patchcore_core import storage

    listing = storage.list_image_versions(images)
    input_root(images, [u for u, _, _ in listing])
    todo = incremental.pending_inputs(listing, index)
    return len(listing), len(todo)


def plan_new(images: str, index: np.ndarray) -> tuple[int, int]:
    """The streamed planner of `patchcore score --incremental`."""
    from jobs import incremental
    from jobs.folders import input_root

    plan = incremental.plan_inputs(images, index, {})
    input_root(images, [plan.first, plan.last])
    return plan.listed, len(plan.uris)


def child(method: str, images: str, index_path: str) -> dict:
    """One measurement in this process: planning time and the peak RSS planning adds."""
    from jobs import incremental  # noqa: F401  (imports before the baseline)

    index = np.load(index_path, allow_pickle=False) if index_path else np.empty(0, np.uint64)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    listed, pending = (plan_old if method == "old" else plan_new)(images, index)
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "peak_mib": _status("VmHWM") - base, "listed": listed, "pending": pending,
            "index": len(index)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="objects in the local folder")
    parser.add_argument("--s3", type=int, default=0, help="objects on a local moto S3 (0: skip)")
    parser.add_argument("--tmp", default="/tmp/listing_bench", help="work folder (kept, reused)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "listing.txt"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    tmp = Path(args.tmp)
    lines = [f"listing bench: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}; "
             "peak MiB = driver RSS added while planning (VmHWM after a reset, minus RSS before)"]
    t0 = time.perf_counter()
    make_folder(tmp / f"folder_{args.n}", args.n)
    lines.append(f"local folder of {args.n:,} empty .png files ready in {time.perf_counter() - t0:.0f} s")
    archives = [("local", str(tmp / f"folder_{args.n}"))]
    if args.s3:
        archives.append(("s3 (moto)", fill_s3(args.s3)))
    lines.append("archive    | planner                   | night   |    listed |   pending |  time s |"
                 "  CPU s | peak MiB | B/listed")
    lines.append("-----------|---------------------------|---------|-----------|-----------|---------|"
                 "--------|----------|---------")
    print("\n".join(lines), flush=True)
    for label, images in archives:
        index_path = tmp / f"index_{label.split()[0]}.npy"
        write_index(images, index_path)
        for night, index in (("first", ""), ("nightly", str(index_path))):
            for method, name in (("old", "old: fsspec find + filter"), ("new", "new: streamed chunks")):
                proc = subprocess.run([sys.executable, __file__, "--child", method, images, index],
                                      capture_output=True, text=True, check=False, env=os.environ)
                if proc.returncode:
                    line = f"{label:<10} | {name:<25} | {night:<7} | failed: {proc.stderr[-300:]}"
                else:
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    line = (f"{label:<10} | {name:<25} | {night:<7} | {r['listed']:>9,} | "
                            f"{r['pending']:>9,} | {r['seconds']:7.1f} | {r['cpu_s']:6.1f} | "
                            f"{r['peak_mib']:8.0f} | {r['peak_mib'] * MIB / r['listed']:8.0f}")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
