"""Time of the data check before training (`llava_next.train.samples.validate`) on a folder of real-sized images.

It writes (once, cached in --cache) N images the size of typical LLaVA training images: 80% JPEG (640x480 to
1024x768, quality 90), 20% PNG (640x480), photo-like (smooth gradients plus noise), one record per image, and times
validate() with the bundled demo model's processor and tokenizer (median of --repeats runs). The last line printed is
JSON.

    python benchmarks/bench_validate.py [--n 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import llava_next
from llava_next.data.records import read_records
from llava_next.train.samples import SampleEncoder, validate


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([127 + 100 * np.sin(x / width * rng.uniform(2, 9) + rng.uniform(0, 6)),
                     127 + 100 * np.cos(y / height * rng.uniform(2, 9)),
                     127 + 100 * np.sin((x + y) / (width + height) * rng.uniform(2, 9))], axis=-1)
    return Image.fromarray((base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8))


def build(folder: Path, n: int) -> Path:
    data = folder / f"records-{n}.json"
    if data.exists():
        return data
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        if i % 5 == 4:
            name = f"{i:05d}.png"
            photo(640, 480, rng).save(folder / name)
        else:
            name = f"{i:05d}.jpg"
            width = int(rng.integers(640, 1025))
            photo(width, width * 3 // 4, rng).save(folder / name, quality=90)
        records.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "Shapes."}]})
    data.write_text(json.dumps(records))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llava-next-bench-validate"))
    args = parser.parse_args()
    folder = Path(args.cache)
    folder.mkdir(parents=True, exist_ok=True)
    data = build(folder, args.n)
    pipe = llava_next.load("demo", progress=False)
    encoder = SampleEncoder(pipe.processor, pipe.engine.eos_token_ids, "chat", 100_000)
    records = read_records(data)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        report = validate(records, encoder, max_bad_fraction=0.0)
        times.append(time.perf_counter() - start)
    megabytes = sum(p.stat().st_size for r in records for p in r.images) / 2**20
    print(f"{args.n} records, {megabytes:.1f} MB of images: validate {statistics.median(times):.2f} s "
          f"(median of {args.repeats}), {len(report.samples)} kept")
    print(json.dumps({"n": args.n, "image_megabytes": round(megabytes, 1), "validate_s": round(statistics.median(times), 3),
                      "kept": len(report.samples), "cpu": platform.processor() or platform.machine(),
                      "threads": os.environ.get("OMP_NUM_THREADS")}))


if __name__ == "__main__":
    main()
