"""Memory of a scoring actor's bank (issue 11 item 5): one copy per node, at 1M entries.

Writes a bank folder of --rows x --dim float32 features (storage.save_bank, in a temporary folder
under --dir, deleted at the end), then loads it in a fresh Python process per case, as a scoring
actor does (model.load: bank + backbone + exact kNN index, threads set), scores one image's worth
of patch features (784 queries, the Eq. 7 reweighting included) and reports that process's memory
from /proc: peak RSS (VmHWM), and Rss, Pss, Uss (Private_*) and Anonymous from smaps_rollup, both
sampled every 50 ms (peak) and read at the end. Cases:

- old: the load path before this change (features.npy read into bytes, np.load(BytesIO), a faiss
  IndexFlatL2 holding its own copy), emulated here;
- faiss: storage.load_bank's memory map + faiss-cpu-exact (faiss.knn over the mapped array);
- torch: the same map searched by torch-cpu-exact;
- 2 x faiss: two processes loading the same bank at once (--threads split between them, as two
  actors on one node split its CPUs); their Pss (pages shared by k processes
  count 1/k in each) is read while both hold the bank, so the sum counts the shared pages once.

    python benchmarks/bank_memory_bench.py > benchmarks/results/bank_memory.txt

Linux only (/proc). The bank needs rows x dim x 4 bytes on disk twice while it is written (a
scratch map plus the bank); the "old" case needs about twice that in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1 << 20
GIB = 1 << 30
CHUNK_ROWS = 1 << 16  # rows generated and written at a time (256 MiB at D = 1024)
SAMPLE_S = 0.05
PATCHES_PER_IMAGE = 784
SMAPS_FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous")


# --------------------------------------------------------------------------- /proc readings


def memory_now() -> dict[str, int]:
    """This process's Rss, Pss, Uss (Private_Clean + Private_Dirty) and Anonymous, in bytes."""
    values = dict.fromkeys(SMAPS_FIELDS, 0)
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0]) * 1024  # kB
    return {"rss": values["Rss"], "pss": values["Pss"],
            "uss": values["Private_Clean"] + values["Private_Dirty"], "anon": values["Anonymous"]}


def mapped_pss(path: str) -> int:
    """Pss (bytes) of this process's memory maps of the file `path` (/proc/self/smaps)."""
    target, inside, total = os.path.realpath(path), False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                inside = len(head) == 6 and head[5].strip() == target
            elif inside and head[0] == "Pss:":
                total += int(head[1]) * 1024
    return total


def peak_rss() -> int:
    """VmHWM: the kernel's peak resident set of this process, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


class Sampler:
    """Largest memory_now() values seen by a thread sampling every SAMPLE_S seconds."""

    def __init__(self) -> None:
        self.peak = memory_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._take()

    def _take(self) -> None:
        self.peak = {k: max(v, self.peak[k]) for k, v in memory_now().items()}

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self._take()
        return self.peak


# --------------------------------------------------------------------------- the bank


def bank_spec(dim: int) -> Any:
    """efficientnet_lite0 (small, offline, random weights) storing dim-wide features."""
    from patchcore_core.spec import ModelSpec

    return ModelSpec(backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
                     embed_dim=dim, low_rank=False)


def write_bank(folder: Path, rows: int, dim: int, seed: int) -> None:
    """A valid bank of rows x dim seeded uniform features, written by storage.save_bank. The
    features are generated into a scratch memory map first, so only save_bank's buffer is heap."""
    import torch

    from patchcore_core import storage
    from patchcore_core.bank import Bank

    scratch = folder / "scratch.npy"
    values = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(seed)
    for lo in range(0, rows, CHUNK_ROWS):
        hi = min(rows, lo + CHUNK_ROWS)
        values[lo:hi] = rng.random((hi - lo, dim), dtype=np.float32)
    values.flush()
    grid = 28
    bank = Bank(spec=bank_spec(dim), features=torch.from_numpy(values),
                image_ids=tuple(f"s3://bucket/train/{i // grid**2:06d}.png" for i in range(rows)),
                ys=torch.arange(rows) // grid % grid, xs=torch.arange(rows) % grid,
                projection_seed=seed, coverage_radius=1.0, info={"bench": "bank_memory"})
    storage.save_bank(str(folder / "bank"), bank)
    del bank, values
    scratch.unlink()


def old_load_bank(uri: str) -> Any:
    """storage.load_bank before the memory map: whole file as bytes, then np.load into a copy
    (the bytes live until the Bank is built, as they did there)."""

    from patchcore_core import storage

    manifest = storage.read_manifest(uri, "bank")
    data = storage.read_bytes(storage.join_uri(uri, manifest["files"]["features"]))
    features = np.load(io.BytesIO(data), allow_pickle=False)
    provenance = storage.read_table(storage.join_uri(uri, manifest["files"]["provenance"]))
    bank = storage.bank_from_parts(manifest, features, provenance)
    del data
    return bank


# --------------------------------------------------------------------------- one case, one process


def wait_for(barrier: Path, stage: str, parties: int) -> None:
    """Mark this process at `stage` and wait until `parties` processes are."""
    (barrier / f"{stage}-{os.getpid()}").touch()
    while len(list(barrier.glob(f"{stage}-*"))) < parties:
        time.sleep(0.05)


def run_case(case: str, uri: str, queries: int, threads: int, barrier: Path | None,
             parties: int) -> dict[str, Any]:
    """Load the bank as a scoring actor does, score `queries` patches; timings and memory."""
    import torch

    from patchcore_core import knn, model

    torch.set_num_threads(threads)
    base = memory_now()
    sampler = Sampler()
    start = time.perf_counter()
    if case == "old":
        bank = old_load_bank(uri)
        scorer = model.PatchCore(bank, "cpu", threads=threads)
        flat = knn._faiss().IndexFlatL2(bank.features.shape[1])
        flat.add(np.ascontiguousarray(bank.features.numpy()))  # the faiss copy it kept
        scorer.index = dataclasses.replace(scorer.index, faiss_index=flat)
    else:
        scorer = model.load(uri, "cpu", threads=threads)  # faiss-cpu-exact on CPU
        if case == "torch":
            scorer.index = knn.build_index(scorer.bank.features, "cpu", engine="torch-cpu-exact")
    load_s = time.perf_counter() - start
    dim = scorer.bank.features.shape[1]
    points = torch.from_numpy(np.random.default_rng(1).random((queries, dim), dtype=np.float32))
    start = time.perf_counter()
    model.score_patches(scorer, points.reshape(1, queries, 1, dim))
    search_s = time.perf_counter() - start
    if barrier is not None:
        wait_for(barrier, "searched", parties)  # every process holds the whole bank now
    end = memory_now()
    end["bank_pss"] = mapped_pss(os.path.join(uri, "features.npy"))
    peak = sampler.stop()
    if barrier is not None:
        wait_for(barrier, "measured", parties)  # nobody exits before all have read their Pss
    return {"case": case, "engine": scorer.index.engine, "load_s": load_s, "search_s": search_s,
            "base": base, "end": end, "peak": peak, "vmhwm": peak_rss()}


# --------------------------------------------------------------------------- driver


def spawn(case: str, uri: str, args: argparse.Namespace, barrier: Path | None = None,
          parties: int = 1) -> subprocess.Popen:
    """One case in a fresh process; `parties` processes at once share the --threads CPUs."""
    threads = max(1, args.threads // parties)
    command = [sys.executable, __file__, "--child", case, "--bank", uri, "--queries",
               str(args.queries), "--threads", str(threads), "--parties", str(parties)]
    if barrier is not None:
        command += ["--barrier", str(barrier)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def collect(processes: Sequence[subprocess.Popen]) -> list[dict[str, Any]]:
    out = []
    for process in processes:
        stdout, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"bench child exited with {process.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def row(label: str, result: dict[str, Any]) -> str:
    mib = lambda value: f"{value / MIB:,.0f}"  # noqa: E731
    end, peak = result["end"], result["peak"]
    return (f"| {label} | {result['engine']} | {result['load_s']:.2f} | {result['search_s']:.2f} | "
            f"{mib(result['base']['rss'])} | {mib(result['vmhwm'])} | {mib(peak['pss'])} | "
            f"{mib(peak['uss'])} | {mib(peak['anon'])} | {mib(end['rss'])} | {mib(end['pss'])} | "
            f"{mib(end['uss'])} | {mib(end['anon'])} | {mib(end['bank_pss'])} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="bank entries (default 1M)")
    parser.add_argument("--dim", type=int, default=1024, help="feature width (default 1024)")
    parser.add_argument("--queries", type=int, default=PATCHES_PER_IMAGE,
                        help="patches scored per case (default 784: one 28 x 28 image)")
    parser.add_argument("--threads", type=int, default=2, help="faiss and torch threads")
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="folder for the temporary bank (default: the system temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=("old", "faiss", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--bank", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--parties", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        barrier = Path(args.barrier) if args.barrier else None
        result = run_case(args.child, args.bank, args.queries, args.threads, barrier, args.parties)
        print(json.dumps(result))
        return 0

    bank_bytes = args.rows * args.dim * 4
    print(" ".join(["# command: python benchmarks/bank_memory_bench.py",
                    *(sys.argv[1:] if argv is None else argv)]))
    free = shutil.disk_usage(args.dir).free
    needed = 2 * bank_bytes + 2 * GIB  # scratch map + bank while writing, plus a margin
    if free < needed:
        print(f"SKIPPED: {args.dir} has {free / GIB:.1f} GiB free, the {args.rows:,} x {args.dim} "
              f"bank needs {needed / GIB:.1f} GiB while it is written; pass --dir with more space "
              "or fewer --rows")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bank-memory-", dir=args.dir))
    try:
        start = time.perf_counter()
        write_bank(work, args.rows, args.dim, args.seed)
        uri = str(work / "bank")
        print(f"bank: {args.rows:,} x {args.dim} float32 = {bank_bytes / MIB:,.0f} MiB "
              f"(features.npy), written in {time.perf_counter() - start:.0f} s; {args.queries} "
              f"queries scored per process (k = 1 and the Eq. 7 search); threads {args.threads}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("MiB columns: base = Rss after imports; peak Rss = VmHWM; peak Pss/Uss/Anon sampled "
              "every 50 ms; end = after the search (for 2 x, while both processes hold the bank); "
              "map Pss = Pss of the process's memory map of features.npy (0: no map, the bank is "
              "in Anon)")
        print("| case | engine | load s | search s | base Rss | peak Rss | peak Pss | peak Uss | "
              "peak Anon | end Rss | end Pss | end Uss | end Anon | map Pss |")
        print("|---|---|" + "---:|" * 12)
        for case in ("old", "faiss", "torch"):
            (result,) = collect([spawn(case, uri, args)])
            print(row(case, result), flush=True)
        barrier = work / "barrier"
        barrier.mkdir()
        pair = collect([spawn("faiss", uri, args, barrier, 2) for _ in range(2)])
        for i, result in enumerate(pair):
            print(row(f"2 x faiss, process {i + 1}", result), flush=True)
        total = {k: sum(r["end"][k] for r in pair) for k in ("rss", "pss", "anon", "bank_pss")}
        print(f"2 x faiss, both at the end: Rss {total['rss'] / MIB:,.0f} MiB, Pss "
              f"{total['pss'] / MIB:,.0f} MiB, Anon {total['anon'] / MIB:,.0f} MiB; Pss of their "
              f"bank maps {total['bank_pss'] / MIB:,.0f} MiB = {total['bank_pss'] / bank_bytes:.3f}"
              " x the bank (shared pages counted once)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
