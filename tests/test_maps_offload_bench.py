"""benchmarks/maps_offload_bench.py runs end to end at toy size and prints its four rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_maps_offload_bench_prints_the_actor_before_after_and_the_write_stage(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.maps_offload_bench", "--images", "2", "--width", "96",
         "--height", "80", "--rounds", "1", "--bank-size", "500", "--workdir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    rows = {line[:34].strip(): line[34:].split() for line in done.stdout.splitlines()
            if line.startswith(("model actor", "write_files"))}
    assert set(rows) == {"model actor, before (inline)", "model actor, after",
                         "model actor, --no-maps", "write_files (CPU stage)"}
    assert rows["model actor, before (inline)"][2] == "1.00"
    assert sorted(p.name for p in (tmp_path / "results" / "maps").iterdir()) == ["000000.png.png",
                                                                                 "000001.png.png"]
