"""Projected wall time of fit and score on N nodes from measured per-stage rates (issue 13 item 4).

The greedy coreset is sequential: every step each of K ranks updates its N/K rows' distances to the
newest centre, then all K agree on the next one by an all-gather (jobs/coreset.py). So a step costs

    step(K) = step_compute(N) / K + collective(K)

and stops scaling once collective(K) dominates: more ranks then make the fit slower. Extract and
score are embarrassingly parallel over images (one model actor per GPU), so they scale with nodes
until storage bandwidth does not (not modelled). The collective's latency is measured here with
gloo over loopback, K processes on this machine: where K exceeds its CPUs the processes take turns
on the cores, which inflates those figures; a network adds its round trips instead. Pass
`--collective-ms K=ms,...` measured on your cluster for a real projection. The other rates are
flags whose defaults are this project's measured figures (README "Measured results"): extract and
score on 2 CPUs, the coreset step on one H200, so the default table mixes CPU and GPU nodes;
give your nodes' rates.

    python benchmarks/cost_model.py
    python benchmarks/cost_model.py --extract-img-s 400 --score-img-s 300 --collective-ms 2=0.3,4=0.4,8=0.6
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PATCHES_PER_IMAGE = 784  # 28 x 28 at 224 px, stride 8 (DESIGN.md §3)
PAYLOAD = 2 + 128  # what one rank proposes per step: value, index, projected vector (jobs/coreset)


def _gather_loop(rank: int, world: int, port: int, steps: int, out: "mp.SimpleQueue") -> None:
    """One rank: `steps` all-gathers of a PAYLOAD-float tensor; rank 0 reports seconds per step."""
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    mine = torch.full((PAYLOAD,), float(rank))
    gathered = [torch.empty(PAYLOAD) for _ in range(world)]
    for _ in range(10):  # warm-up: connections, buffers
        dist.all_gather(gathered, mine)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        dist.all_gather(gathered, mine)
    if rank == 0:
        out.put((time.perf_counter() - start) / steps)
    dist.destroy_process_group()


def measure_collective_ms(world: int, steps: int) -> float:
    """Milliseconds per all-gather step among `world` local gloo processes."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    procs = [context.Process(target=_gather_loop, args=(r, world, port, steps, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.exitcode != 0:
            raise RuntimeError(f"collective benchmark rank exited with {p.exitcode}")
    return 1000.0 * queue.get()


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=float, default=100e6, help="training patches of the fit")
    parser.add_argument("--ratio", type=float, default=0.01, help="coreset share = greedy steps / N")
    parser.add_argument("--archives", default="1e6,1e7", help="images to score, comma-separated")
    parser.add_argument("--nodes", default="1,2,4,8,16", help="GPU nodes (one actor / rank each)")
    parser.add_argument("--extract-img-s", type=float, default=34.6,
                        help="extract images/s of one node (default: efficientnet_lite0 on this "
                             "2-core CPU, README 'Extract'; use your GPU's figure)")
    parser.add_argument("--score-img-s", type=float, default=6.5,
                        help="score images/s of one node (default: lite0, a 1%% bank, steady state on 2 CPUs)")
    parser.add_argument("--step-rows-per-s", type=float, default=419 * 10e6,
                        help="coreset rows updated per second by one rank (default: H200, "
                             "419 steps/s at 10M rows, README 'GPU')")
    parser.add_argument("--collective-ms", default="",
                        help="K=ms,... all-gather latency per step; default: measured here")
    parser.add_argument("--collective-steps", type=int, default=300)
    args = parser.parse_args(argv)
    nodes = [int(n) for n in args.nodes.split(",")]
    if args.collective_ms:
        latency = {int(k): float(v) for k, v in (p.split("=") for p in args.collective_ms.split(","))}
        source = "given"
    else:
        latency = {1: 0.0}
        for k in sorted({min(n, os.cpu_count() * 4) for n in nodes if n > 1}):
            latency[k] = measure_collective_ms(k, args.collective_steps)
        source = f"measured: gloo on loopback, {os.cpu_count()} CPUs"
    known = sorted(latency)
    print(f"# all-gather per step ({source}): "
          + ", ".join(f"K={k} {latency[k]:.3f} ms" for k in known))

    steps = args.patches * args.ratio
    images = args.patches / PATCHES_PER_IMAGE
    print(f"# fit: {args.patches:,.0f} patches = {images:,.0f} images, {steps:,.0f} greedy steps; "
          f"one rank updates {args.step_rows_per_s:,.0f} rows/s")
    print(f"\n{'nodes':>6}{'extract':>12}{'step ms':>10}{'  (compute':>11}{' + collective)':>15}"
          f"{'coreset':>12}{'fit':>12}" + "".join(f"{'score ' + f'{float(a):.0e}':>14}"
                                                  for a in args.archives.split(",")))
    for n in nodes:
        collective = latency.get(n, latency[max(k for k in known if k <= n)])  # nearest measured
        compute_ms = 1000.0 * args.patches / n / args.step_rows_per_s
        step_ms = compute_ms + collective
        extract_s = images / (args.extract_img_s * n)
        coreset_s = steps * step_ms / 1000.0
        scores = [float(a) / (args.score_img_s * n) for a in args.archives.split(",")]
        print(f"{n:>6}{hours(extract_s):>12}{step_ms:>10.3f}{compute_ms:>11.3f}{collective:>15.3f}"
              f"{hours(coreset_s):>12}{hours(extract_s + coreset_s):>12}"
              + "".join(f"{hours(s):>14}" for s in scores))
    if len(known) > 1:
        stop = next((n for n in nodes if 1000.0 * args.patches / n / args.step_rows_per_s
                     < latency.get(n, latency[max(k for k in known if k <= n)])), None)
        print(f"\nThe greedy step stops scaling where the per-rank compute falls below the "
              f"collective's latency: {'at ' + str(stop) + ' ranks' if stop else 'not within these node counts'}.")


if __name__ == "__main__":
    main()
