"""What content fingerprints cost at start-up: `python -m bench.fingerprint --json [--megabytes N]`.

Times `content_fingerprint` on the generated tiny model and adapter, then on a model folder holding
one N MB safetensors file (random bytes, read from the page cache as after a model load), and
estimates the time for the 2.3 GB Qwen3-4B 4-bit model from that rate. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sidecar.sessions.fingerprint import content_fingerprint
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

QWEN3_4B_4BIT_BYTES = 2.26e9
CHUNK = 64 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    """Measure and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=1024, help="size of the large weights file")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="delta-mem-fingerprint-") as tmp:
        work = Path(tmp)
        model = write_tiny_model(work / "tiny")
        adapter = write_tiny_adapter(work / "adapter", model)
        tiny_s = _median_time(lambda: content_fingerprint(str(model), str(adapter)), args.runs)
        large = work / "large"
        large.mkdir()
        _write_random(large / "model.safetensors", args.megabytes * 1024 * 1024)
        (large / "config.json").write_text("{}")
        content_fingerprint(str(large), None)  # once, so that the file is in the page cache
        large_s = _median_time(lambda: content_fingerprint(str(large), None), args.runs)
    rate = args.megabytes * 1024 * 1024 / large_s
    report: dict[str, Any] = {
        "tiny_model_ms": round(tiny_s * 1000, 2),
        "large_file_mb": args.megabytes,
        "large_file_s": round(large_s, 3),
        "hash_rate_mb_s": round(rate / 1e6),
        "estimated_qwen3_4b_4bit_s": round(QWEN3_4B_4BIT_BYTES / rate, 2),
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def _median_time(work: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        for start in range(0, size, CHUNK):
            handle.write(os.urandom(min(CHUNK, size - start)))


if __name__ == "__main__":
    raise SystemExit(main())
