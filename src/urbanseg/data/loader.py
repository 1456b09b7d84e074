"""PyTorch datasets over TFRecord shards, an exact epoch sampler and the loader.

Random access goes through the `.index` files, and both CRCs of every record are checked
on every read. Data order and augmentation are functions of (seed, epoch, index) only:
`EpochSampler` yields `(index, sample_seed)` keys, `ShardDataset` seeds a fresh
`torch.Generator` from `sample_seed` for the transform, so batches are identical with any
number of workers and resuming at sample `start` of an epoch yields the tail of the
uninterrupted epoch.

PNGs are decoded by `pixels.decode_png` (kornia-rs, or OpenCV: the same pixels). Labels stay
uint8 (as stored) all the way to the batch: the trainer makes them int64 on its device, so
the DataLoader moves 1/8 of the label bytes.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from urbanseg.data import tfrecord
from urbanseg.data.formats import Manifest, ShardSpec
from urbanseg.data.pixels import decode_png, to_planes
from urbanseg.errors import UserError

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentation (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class ShardDataset(Dataset):
    """One split of a shard folder (`<root>/<split>/` written by `urbanseg pack`).

    `dataset[i]` (or `dataset[(i, sample_seed)]`, as `EpochSampler` yields) returns
    {"image": uint8 tensor (3, H, W) RGB, "label": uint8 tensor (H, W) class indices with
    255 = ignore, "name": source stem str, "id": int record id == i}, after
    `transform(image, label, generator)` if given; a plain index gets the generator of
    sample_seed(0, 0, i).

    `.spec` is the split's spec.json (`urbanseg.data.formats.ShardSpec`), `.label_set` its
    LabelSet. A label value that is neither a class index nor the ignore index is a
    CorruptRecordError naming the shard, the record and the values. File descriptors are
    opened lazily per process, so the dataset is safe to use in forked DataLoader workers.
    """

    def __init__(self, root: Path | str, split: str, transform: Transform | None = None) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        split_dir = self.root / split
        if not split_dir.is_dir():
            if (self.root / Manifest.FILE).is_file():
                raise UserError(
                    f"{self.root} is a prepared folder (it has manifest.json), not shards: pack it first, "
                    f"`urbanseg pack --prepared {self.root} --out SHARDS`, and give SHARDS"
                )
            have = sorted(p.parent.name for p in self.root.glob("*/spec.json"))
            raise UserError(
                f"no split {split!r} in shard folder {self.root} (found: {have or 'nothing'}); "
                f"run `urbanseg pack --out {self.root}` with that split prepared"
            )
        self.spec = ShardSpec.load(split_dir / ShardSpec.FILE)
        self.label_set = self.spec.label_set
        self.paths = [split_dir / s.file for s in self.spec.shards]
        shard, offset, length = [], [], []
        for k, (path, info) in enumerate(zip(self.paths, self.spec.shards, strict=True)):
            if not path.is_file():
                raise UserError(
                    f"shard {path} listed in {split_dir / ShardSpec.FILE} is missing; re-run `urbanseg pack`"
                )
            index = tfrecord.read_index(path)
            if len(index) != info.records:
                raise UserError(
                    f"{tfrecord.index_path(path)} lists {len(index)} records, spec.json "
                    f"{info.records}; rebuild it with urbanseg.data.tfrecord.build_index({str(path)!r}) "
                    "or re-run `urbanseg pack`"
                )
            shard.append(np.full(len(index), k, np.int64))
            offset.append(index[:, 0])
            length.append(index[:, 1])
        self._shard = np.concatenate(shard) if shard else np.zeros(0, np.int64)
        self._offset = np.concatenate(offset) if offset else np.zeros(0, np.int64)
        self._length = np.concatenate(length) if length else np.zeros(0, np.int64)
        self._first = np.concatenate([[0], np.cumsum([s.records for s in self.spec.shards])])
        # 256-entry table: 1 for a label value that is neither a class index nor the ignore index.
        self._bad_value = np.ones(256, np.uint8)
        self._bad_value[: self.label_set.num_classes] = 0
        self._bad_value[self.label_set.ignore_index] = 0
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self._shard)

    def __getstate__(self) -> dict[str, Any]:
        # Descriptors are per process: a pickled copy (spawned worker) opens its own.
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_pid", -1) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # first use in this process (e.g. a forked worker)
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def read_example(self, index: int) -> dict[str, list]:
        """The decoded features of record `index` (CRCs checked), id checked against `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records in {self.root / self.split}")
        k = int(self._shard[index])
        local = index - int(self._first[k])
        data = tfrecord.read_record(
            self._fd(k), int(self._offset[index]), int(self._length[index]), record=local, name=self.paths[k]
        )
        example = tfrecord.decode_example(data)
        if example.get("id") != [index]:
            raise tfrecord.CorruptRecordError(
                f"{self.paths[k]}: record {local} has id {example.get('id')}, expected "
                f"[{index}]: the shards and spec.json disagree; re-run `urbanseg pack`"
            )
        return example

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)
        index = index + len(self) if index < 0 else index
        example = self.read_example(index)
        image, label = self._decode(example, index)
        if self.transform is not None:
            generator = torch.Generator().manual_seed(sample_seed(0, 0, index) if seed is None else seed)
            image, label = self.transform(image, label, generator)
        return {"image": image, "label": label, "name": example["name"][0].decode(), "id": index}

    def _decode(self, example: dict[str, list], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(self._shard[index])
        where = f"{self.paths[k]}: record {index - int(self._first[k])}"
        shape = (self.spec.height, self.spec.width)
        image = decode_png(example["image_data"][0], shape, grey=False)
        label = decode_png(example["label_data"][0], shape, grey=True)
        if image is None or label is None or label.ndim != 2 or label.dtype != np.uint8:
            raise tfrecord.CorruptRecordError(
                f"{where}: image_data or label_data is not a PNG of the expected kind "
                "(RGB image, 8-bit single-channel label); re-run `urbanseg pack`"
            )
        spec = self.spec
        if image.shape[:2] != label.shape or label.shape != (spec.height, spec.width):
            raise tfrecord.CorruptRecordError(
                f"{where}: image {image.shape[1]}x{image.shape[0]}, label "
                f"{label.shape[1]}x{label.shape[0]}, spec.json {spec.width}x"
                f"{spec.height}; re-run `urbanseg pack`"
            )
        self._check_label_values(label, where)
        return to_planes(image), torch.from_numpy(label)

    def _check_label_values(self, label: np.ndarray, where: str) -> None:
        """Every value is a class index or the ignore index; else CorruptRecordError naming
        the values (a loss or a confusion matrix would fail later without saying where).
        One table lookup and a count over the (H, W) uint8 label, ~1 ms for 2048x1024."""
        bad = cv2.LUT(label, self._bad_value)
        if cv2.countNonZero(bad):
            values = np.unique(label[bad.astype(bool)]).tolist()
            ls = self.label_set
            raise tfrecord.CorruptRecordError(
                f"{where}: label values {values[:10]} are outside label set {ls.name!r} (class indices "
                f"0..{ls.num_classes - 1}, {ls.ignore_index} = ignore): its label image was not made with this "
                "label set; re-run `urbanseg prepare` and `urbanseg pack` into new folders"
            )


class EpochSampler(Sampler):
    """This rank's share of an epoch, as `(index, sample_seed)` keys for ShardDataset.

    The epoch order is a permutation of range(size) from (seed, epoch) (or range(size)
    when shuffle=False); rank r takes order[r::world_size], so the ranks together cover
    every index exactly once (no padding, no dropping: ranks may differ by one sample).
    `set_epoch(epoch, start)` selects the epoch and skips the first `start` samples of this
    rank's order (resume mid-epoch); call it before every epoch (start resets to 0 only
    through it).
    """

    def __init__(self, size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if size < 0 or seed < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(
                f"EpochSampler: need size >= 0, seed >= 0 and 0 <= rank < world_size, got size={size} "
                f"seed={seed} rank={rank} world_size={world_size}"
            )
        self.size, self.shuffle, self.seed, self.rank, self.world_size = size, shuffle, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if epoch < 0 or not 0 <= start <= len(self.order(epoch)):
            raise UserError(
                f"EpochSampler.set_epoch: epoch {epoch} must be >= 0 and start {start} within this "
                f"rank's {len(self.order(max(epoch, 0)))} samples"
            )
        self.epoch, self.start = epoch, start

    def order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices for `epoch` (default: the current one), int64 (n,), before `start`."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.rank, self.size, self.world_size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.order()[self.start :].tolist():
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size)) - self.start


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """ShardDataset items (images and labels of one size) -> {"image": uint8 (N, 3, H, W),
    "label": uint8 (N, H, W), "name": list[str], "id": int64 (N,)}.

    The three tensors are views of one buffer, allocated in shared memory inside a
    DataLoader worker: the batch crosses to the main process as one file descriptor,
    not three, and is written once (default_collate makes a shared segment per tensor)."""
    n = len(items)
    c, h, w = items[0]["image"].shape
    sizes = [8 * n, n * c * h * w, n * h * w]  # the int64 ids first: aligned at offset 0
    nbytes = sum(sizes)
    # _new_shared: the (private) call default_collate itself makes for a worker's batch
    storage = torch.UntypedStorage._new_shared(nbytes) if get_worker_info() else torch.UntypedStorage(nbytes)
    ids, image, label = torch.empty(0, dtype=torch.uint8).set_(storage).split(sizes)
    ids, image, label = ids.view(torch.int64), image.view(n, c, h, w), label.view(n, h, w)
    for i, item in enumerate(items):
        image[i], label[i], ids[i] = item["image"], item["label"], item["id"]
    return {"image": image, "label": label, "name": [item["name"] for item in items], "id": ids}


def build_loader(
    root: Path | str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    augment: dict[str, Any] | bool | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over `<root>/<split>` yielding {"image": uint8 (N, 3, H, W), "label":
    uint8 (N, H, W) (255 = ignore; the trainer makes it int64 on its device), "name":
    list[str], "id": int64 (N,)}.

    train=True shuffles (per seed and epoch) and augments (`augment`: None/True -> the
    `transforms.Augment` defaults, a dict -> Augment(**augment), False -> none);
    train=False keeps file order and never augments. `start` is the number of this rank's
    samples of `epoch` already consumed. For the next epoch call
    `loader.sampler.set_epoch(epoch + 1)` before iterating again (workers persist).
    `pin_memory` (default: whether CUDA is available) only helps a CUDA consumer: the
    trainer passes whether its device is CUDA.
    """
    from urbanseg.data.transforms import Augment, TrainTransform

    transform = None
    if train and augment is not False:
        transform = TrainTransform(Augment(**augment) if isinstance(augment, dict) else Augment())
    dataset = ShardDataset(root, split, transform)
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size)
    sampler.set_epoch(epoch, start)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=_leave_stops_to_the_trainer if workers > 0 else None,
    )


def _leave_stops_to_the_trainer(worker_id: int) -> None:
    """A worker ignores Ctrl-C, and SIGTERM from anyone but its trainer. Both reach every
    process of the job (a terminal's process group, timeout(1), Slurm, systemd); the
    trainer finishes its step, saves last.pt and ends the workers itself. A worker dying of
    the signal made PyTorch raise in the trainer ("DataLoader worker ... is killed by
    signal") before anything was saved. The trainer's own SIGTERM must still end it:
    multiprocessing sends one to a loader's workers left running at exit, and waits for
    them. So SIGTERM is blocked and taken by a thread that knows the sender."""
    trainer = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on too

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == trainer:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="urbanseg-sigterm", daemon=True).start()
