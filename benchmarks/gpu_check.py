"""GPU paths checked against CPU references and timed in one short run (issue 5, DESIGN.md §6).

1. kNN: the cuda engine (faiss GPU, or torch on the GPU without it) == faiss CPU (ids, distances).
2. scores: `model.predict` on cuda == on cpu for the same bank (efficientnet_lite0, packaged
   offline weights), scores and maps within tolerance: with cuDNN's default (TF32 convolutions
   allowed) and with TF32 off.
3. scoring: wide_resnet50_2 images/s through `model.predict` with banks of 16k and 100k entries,
   for each exact GPU engine (torch; faiss GPU when installed), scores == faiss CPU.
4. coreset: `greedy_coreset` on cuda == the plain loop on cuda == cpu (bit-identical indices) on a
   subset, then steps/s of `MinDistances` and of the plain loop at N = 10,000,000 x 128.

    python benchmarks/gpu_check.py             # on a CUDA machine, about 2-4 minutes
    python benchmarks/gpu_check.py --cpu-smoke  # tiny sizes on CPU: checks the script itself

Prints a summary; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from patchcore_core import backbone, coreset, knn, model
from patchcore_core.bank import Bank
from patchcore_core.features import feature_width
from patchcore_core.spec import ModelSpec


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_faiss(device: torch.device, smoke: bool) -> tuple[str, bool, str]:
    rng = np.random.default_rng(0)
    bank = torch.from_numpy(rng.standard_normal((2_000 if smoke else 200_000, 64), dtype=np.float32))
    queries = torch.from_numpy(rng.standard_normal((200 if smoke else 5_000, 64), dtype=np.float32))
    ref_d, ref_i = knn.search(knn.build_index(bank, "cpu"), queries, 5)
    if device.type == "cuda":
        index = knn.build_index(bank, device)  # faiss GPU, or torch on the GPU without it
        name = f"{index.engine} == faiss CPU"
        new_d, new_i = knn.search(index, queries, 5)
    else:  # smoke: the same comparison against the torch brute force
        name = "faiss CPU == torch brute force (smoke)"
        new_d, new_i = knn.brute_force_search(bank, queries, 5)
    same_ids = float((new_i == ref_i).float().mean())
    max_diff = float((new_d - ref_d).abs().max())
    ok = same_ids > 0.999 and max_diff < 1e-4 * max(1.0, float(ref_d.max()))
    return name, ok, f"ids equal {same_ids:.4%}, max |dist diff| {max_diff:.2e}"


def demo_images(count: int, size: int, split: str, seed: int) -> torch.Tensor:
    from jobs import demo_data  # noqa: PLC0415 - only this check needs the demo textures

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    images = []
    for index in range(count):
        defect = "good" if split == "train" else "stain"
        sample = demo_data.demo_sample("brick", split, defect, index, size=size, seed=seed)
        pixels = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255
        images.append((pixels - mean) / std)
    return torch.stack(images)


def check_scores(device: torch.device, smoke: bool) -> list[tuple[str, bool, str]]:
    """`model.predict` on `device` against cpu, as PyTorch runs by default (cuDNN convolutions
    may use TF32, 10-bit mantissa: tolerance 2e-3 of the largest score) and with TF32 off
    (full float32: 1e-4)."""
    size = 64 if smoke else 224
    spec = ModelSpec(
        backbone="efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights="default",
        resize=size, crop=size,
    )
    train = demo_images(4 if smoke else 8, size, "train", 0)
    test = demo_images(2 if smoke else 4, size, "test", 1)
    on_cpu = model.fit(train, spec, ratio=0.1, device="cpu")
    reference = model.predict(on_cpu, test)
    scale = float(reference.scores.abs().max())
    map_scale = float(reference.maps.abs().max())
    results = []
    saved = torch.backends.cudnn.allow_tf32
    for tf32, tolerance in ((saved, 2e-3), (False, 1e-4)):
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            begin = time.perf_counter()
            result = model.predict(model.PatchCore(on_cpu.bank, device), test)
            seconds = time.perf_counter() - begin
        finally:
            torch.backends.cudnn.allow_tf32 = saved
        score_diff = float((result.scores - reference.scores).abs().max())
        map_diff = float((result.maps - reference.maps).abs().max())
        ok = score_diff <= tolerance * scale + 1e-5 and map_diff <= 10 * tolerance * map_scale + 1e-5
        results.append((
            f"scores {device.type} == cpu (cuDNN TF32 {'allowed' if tf32 else 'off'})", ok,
            f"max |score diff| {score_diff:.2e} = {score_diff / scale:.1e} of the largest score "
            f"{scale:.3f} (tolerance {tolerance:g}), max |map diff| {map_diff:.2e} = "
            f"{map_diff / map_scale:.1e} of the largest [{seconds:.1f} s]",
        ))
    return results


def random_bank(spec: ModelSpec, size: int, seed: int = 0) -> Bank:
    """A bank of `size` random entries at the spec's stored width: exact kNN costs the same
    whatever the values, and the scores of two engines on it must still agree."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(size, feature_width(spec), generator=generator)
    zeros = torch.zeros(size, dtype=torch.int64)
    return Bank(spec=spec, features=features, image_ids=tuple(f"r{i}" for i in range(size)),
                ys=zeros, xs=zeros, projection_seed=seed, coverage_radius=1.0)


def check_score_rate(device: torch.device, smoke: bool, args: argparse.Namespace
                     ) -> list[tuple[str, bool, str]]:
    """wide_resnet50_2 scoring on `device`: images/s of `model.predict` (backbone, exact kNN,
    Eq. 7, maps) for each bank size and exact engine (faiss GPU when installed, torch on the
    GPU), after one warm-up batch, and its scores against faiss CPU on the same bank (TF32 off;
    tolerance 1e-4 of the largest score). Random weights: the same work as ImageNet weights."""
    size = 64 if smoke else 224
    spec = ModelSpec(backbone="resnet18" if smoke else "wide_resnet50_2", weights="none",
                     resize=size, crop=size, embed_dim=64 if smoke else 1024)
    count, batch = (8, 4) if smoke else (args.score_images, args.score_batch)
    images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))
    extractor = backbone.load_backbone(spec, device)
    cpu_extractor = backbone.load_backbone(spec, torch.device("cpu"))
    engines = ["torch-cuda-exact"] + (["faiss-gpu-exact"] if knn.faiss_gpu_count() else [])
    if device.type != "cuda":
        engines = ["faiss-cpu-exact", "torch-cpu-exact"]
    results = []
    saved = torch.backends.cudnn.allow_tf32
    for bank_size in ([500, 2_000] if smoke else args.score_banks):
        bank = random_bank(spec, bank_size)
        reference = model.predict(model.PatchCore(bank, "cpu", cpu_extractor), images[:batch])
        scale = float(reference.scores.abs().max())
        for engine in engines:
            patchcore = model.PatchCore(bank, device, extractor)
            patchcore.index = knn.build_index(bank.features, device, engine=engine)
            model.predict(patchcore, images[:batch], batch_size=batch)  # warm-up
            sync(device)
            begin = time.perf_counter()
            for lo in range(0, count, batch):
                model.predict(patchcore, images[lo : lo + batch], batch_size=batch)
            sync(device)
            rate = count / (time.perf_counter() - begin)
            torch.backends.cudnn.allow_tf32 = False
            try:
                exact = model.predict(patchcore, images[:batch], batch_size=batch)
            finally:
                torch.backends.cudnn.allow_tf32 = saved
            diff = float((exact.scores - reference.scores).abs().max())
            ok = diff <= 1e-4 * scale + 1e-5
            results.append((f"score {spec.backbone} bank {bank_size:,} {engine}", ok,
                            f"{rate:.1f} img/s (batch {batch}, {count} images); max |score diff| "
                            f"vs faiss CPU {diff:.2e} = {diff / scale:.1e} of the largest"))
    return results


def synthetic_points(num_points: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(N, 128) float32 low-intrinsic-dimension points, made on `device` in chunks."""
    generator = torch.Generator(device=device).manual_seed(seed)
    mixing = torch.randn(16, 1024, generator=generator, device=device) / 4
    projection = coreset.projection_matrix(1024, 128, seed).to(device)
    out = torch.empty(num_points, 128, device=device)
    for lo in range(0, num_points, 1 << 20):
        rows = min(1 << 20, num_points - lo)
        latent = torch.randn(rows, 16, generator=generator, device=device)
        out[lo : lo + rows] = torch.sin(latent @ mixing).half().float() @ projection
    return out


def plain_steps(points: torch.Tensor, num_steps: int, start: int) -> list[int]:
    """The plain loop on the points' device, with the bit-exact row distance."""
    min_sq = torch.full((len(points),), math.inf, device=points.device)
    chosen, index = [], start
    for _ in range(num_steps):
        chosen.append(index)
        min_sq = torch.minimum(min_sq, coreset.sq_distances_to(points, points[index]))
        min_sq[index] = coreset.SELECTED
        index = int(torch.argmax(min_sq))
    return chosen


def check_coreset(device: torch.device, smoke: bool, args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    results = []
    subset = synthetic_points(20_000 if smoke else 200_000, device, seed=1)
    steps = 100 if smoke else 300
    fast = coreset.greedy_coreset(subset, steps, start=5).indices.tolist()
    plain = plain_steps(subset, steps, 5)
    cpu = coreset.greedy_coreset(subset.cpu(), steps, start=5).indices.tolist()
    results.append((f"coreset {device.type}: fast == plain == cpu ({len(subset):,} rows, {steps} steps)",
                    fast == plain == cpu, f"first {steps} indices compared"))
    del subset
    num_points = 20_000 if smoke else args.coreset_n
    points = synthetic_points(num_points, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    begin = time.perf_counter()
    state = coreset.MinDistances(points, window=args.window)
    sync(device)
    setup = time.perf_counter() - begin
    index, chosen = 0, []
    num_steps = 50 if smoke else args.coreset_steps
    begin = time.perf_counter()
    for _ in range(num_steps):
        chosen.append(index)
        state.add_centre(state.row(index), index)
        _, index = state.argmax(0)
    sync(device)
    fast_rate = num_steps / (time.perf_counter() - begin)
    pairs = state.pairs_computed / (num_points * num_steps)
    num_plain = 10 if smoke else args.plain_steps
    begin = time.perf_counter()
    plain = plain_steps(points, num_plain, 0)
    sync(device)
    plain_rate = num_plain / (time.perf_counter() - begin)
    memory = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB "
              f"(points {points.numel() * 4 / 2**30:.1f} GiB)") if device.type == "cuda" else ""
    results.append((
        f"coreset timing N={num_points:,} x 128 on {device.type}", plain == chosen[:num_plain],
        f"fast {fast_rate:.0f} steps/s over {num_steps} steps (setup {setup:.1f} s, "
        f"{pairs:.2%} of pairs computed), plain {plain_rate:.1f} steps/s over {num_plain} steps: "
        f"{fast_rate / plain_rate:.1f}x; first {num_plain} indices equal{memory}",
    ))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (checks the script)")
    parser.add_argument("--coreset-n", type=int, default=10_000_000)
    parser.add_argument("--coreset-steps", type=int, default=2_000)
    parser.add_argument("--plain-steps", type=int, default=100)
    parser.add_argument("--window", type=int, default=16, help="MinDistances queue length")
    parser.add_argument("--score-banks", type=lambda t: [int(v) for v in t.split(",")],
                        default=[16_000, 100_000], help="bank sizes of the scoring section")
    parser.add_argument("--score-images", type=int, default=256, help="images per scoring rate")
    parser.add_argument("--score-batch", type=int, default=32, help="batch size of the scoring rate")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device; run with --cpu-smoke to check the script on CPU")
    print(f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"float32 matmul precision {torch.get_float32_matmul_precision()}", flush=True)
    results = []
    begin = time.perf_counter()
    name, ok, detail = check_faiss(device, args.cpu_smoke)
    results.append((name, ok, f"{detail} [{time.perf_counter() - begin:.0f} s]"))
    print(("PASS " if ok else "FAIL ") + f"{name}: {results[-1][2]}", flush=True)
    for name, ok, detail in check_scores(device, args.cpu_smoke):
        results.append((name, ok, detail))
        print(("PASS " if ok else "FAIL ") + f"{name}: {detail}", flush=True)
    for name, ok, detail in check_score_rate(device, args.cpu_smoke, args):
        results.append((name, ok, detail))
        print(("PASS " if ok else "FAIL ") + f"{name}: {detail}", flush=True)
    for name, ok, detail in check_coreset(device, args.cpu_smoke, args):
        results.append((name, ok, detail))
        print(("PASS " if ok else "FAIL ") + f"{name}: {detail}", flush=True)
    failed = [name for name, ok, _ in results if not ok]
    print(f"\nsummary: {len(results) - len(failed)} passed, {len(failed)} failed" +
          (f" ({'; '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
