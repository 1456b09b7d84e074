"""The checks made before any work: what reading every shard's CRCs costs `urbanseg train`
before its first step, and the peak memory per pixel of synth and prepare against the
estimates in `urbanseg.memory` (which refuse sizes that would not fit).

Verification: a split of random-payload records (`--gb` of them) is written, then read by
`tfrecord.verify_shards` (CRCs, index, ids) and, for reference, by a plain read + CRC32C
of each file; from the page cache (the files were just written), wall time, median of
`--rounds`. Memory: one scene / one pair in a fresh process, the growth of its peak
resident memory (VmHWM, reset just before the call; Linux) over its resident memory then,
per output pixel.

    python benchmarks/bench_checks.py
    python benchmarks/bench_checks.py --gb 1 --rounds 5 --sizes 2048x1024 8192x4096
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from urbanseg import memory
from urbanseg.data.tfrecord import encode_example, frame_record, index_path, verify_shards

RECORD_BYTES = 600_000  # about one 2048x1024 Cityscapes photo + labels as PNGs


def write_split(split: Path, total_bytes: float, shards: int = 4) -> int:
    """A packed-split look-alike of random-payload records (spec.json with the keys
    verify_shards reads); returns its size in bytes."""
    split.mkdir(parents=True)
    n = max(shards, int(total_bytes // RECORD_BYTES))
    entries, record_id = [], 0
    for k in range(shards):
        name, rows = f"{k:05d}-of-{shards:05d}.tfrecord", []
        with open(split / name, "wb") as f:
            for _ in range(n // shards):
                payload = os.urandom(RECORD_BYTES)
                record = frame_record(
                    encode_example(
                        {
                            "id": record_id,
                            "name": f"r{record_id}",
                            "image_data": payload[: -RECORD_BYTES // 10],
                            "label_data": payload[-RECORD_BYTES // 10 :],
                        }
                    )
                )
                rows.append((f.tell(), len(record)))
                f.write(record)
                record_id += 1
        index_path(split / name).write_text("".join(f"{o} {m}\n" for o, m in rows))
        entries.append({"file": name, "records": len(rows), "bytes": sum(m for _, m in rows)})
    (split / "spec.json").write_text(json.dumps({"shards": entries, "data_length": record_id}))
    return sum(e["bytes"] for e in entries)


def read_and_crc(split: Path) -> None:
    import google_crc32c

    for path in sorted(split.glob("*.tfrecord")):
        with open(path, "rb") as f:
            crc = 0
            while chunk := f.read(1 << 22):
                crc = google_crc32c.extend(crc, chunk)


def bench_verify(gb: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(tmp) / "train"
        size = write_split(split, gb * 1e9)
        times: dict[str, list[float]] = {"verify_shards (urbanseg train)": [], "read + CRC32C only": []}
        for _ in range(rounds):
            for name, fn in (
                ("verify_shards (urbanseg train)", lambda: verify_shards(split, progress=False)),
                ("read + CRC32C only", lambda: read_and_crc(split)),
            ):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    per_gb = {k: statistics.median(v) / (size / 1e9) for k, v in times.items()}
    base = per_gb["read + CRC32C only"]
    print(f"\nshard verification, {size / 1e9:.2f} GB from the page cache, median of {rounds} rounds\n")
    print("| check | s per GB | x read + CRC32C |\n|-|-|-|")
    for name, value in per_gb.items():
        print(f"| {name} | {value:.2f} | {value / base:.1f} |")


PEAK = """
import sys
from pathlib import Path
stage, w, h, tmp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
from urbanseg.synth.writer import _make_one, scene_paths

def status(key):  # kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])

def reset_peak():  # Linux >= 4.0: VmHWM := VmRSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS:")

if stage == "prepare":
    from urbanseg.data.prepare import Conversion, Pair, process_pair
    from urbanseg.labels import get_label_set

    def run(folder, size):
        paths = scene_paths(folder, "train", 0)
        pair = Pair("train", "c", "s", paths["image"], paths["labelIds"], tmp / "i.png", tmp / "l.png")
        process_pair(pair, Conversion(size, "labelIds", get_label_set("classes19")), redo=True)
    run(tmp / "tiny", (8, 8))  # imports and first-call allocations, outside the measurement
    before = reset_peak()
    run(tmp / "raw", (w, h))
else:
    _make_one((tmp / "tiny", 0, "train", 0, 64, 32))
    before = reset_peak()
    _make_one((tmp / "raw", 0, "train", 0, w, h))
print((status("VmHWM:") - before) * 1024)
"""


def peak_bytes(stage: str, size: tuple[int, int], raw: tuple[int, int]) -> int:
    """Peak memory growth of one synth scene at `size`, or one prepare pair `raw` -> `size`,
    each in a fresh process (the raw scene is made by this one)."""
    from urbanseg.synth.writer import _make_one

    with tempfile.TemporaryDirectory() as tmp:
        if stage == "prepare":
            _make_one((Path(tmp) / "raw", 0, "train", 0, *raw))
            _make_one((Path(tmp) / "tiny", 0, "train", 0, 64, 32))
        out = subprocess.run(
            [sys.executable, "-c", PEAK, stage, *map(str, size), tmp], check=True, capture_output=True, text=True
        ).stdout
    return int(out.split()[-1])


def bench_memory(sizes: list[tuple[int, int]]) -> None:
    print("\npeak memory of one worker (VmHWM growth), bytes per output pixel\n")
    print("| stage | raw -> output | measured B/px | urbanseg.memory estimate B/px | estimate / measured |")
    print("|-|-|-|-|-|")
    for w, h in sizes:
        rows = [("synth", (w, h), (0, 0), memory.SYNTH_BYTES_PER_PIXEL * w * h)]
        for raw in dict.fromkeys([(2048, 1024), (w, h)]):  # Cityscapes' size, and no resize
            rows.append(
                (
                    "prepare",
                    (w, h),
                    raw,
                    memory.PREPARE_BYTES_PER_RAW_PIXEL * raw[0] * raw[1] + memory.PREPARE_BYTES_PER_OUT_PIXEL * w * h,
                )
            )
        for stage, size, raw, estimate in rows:
            measured = peak_bytes(stage, size, raw)
            what = f"{raw[0]}x{raw[1]} -> {w}x{h}" if stage == "prepare" else f"{w}x{h}"
            print(
                f"| {stage} | {what} | {measured / (w * h):.1f} | {estimate / (w * h):.1f} | "
                f"{estimate / max(measured, 1):.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=0.5, help="size of the verified split")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["512x256", "2048x1024", "4096x2048"],
        help="output sizes WxH for the memory table",
    )
    args = parser.parse_args()
    bench_verify(args.gb, args.rounds)
    bench_memory([tuple(int(v) for v in s.split("x")) for s in args.sizes])


if __name__ == "__main__":
    main()
