import cv2
import numpy as np
import pytest
import torch

from helpers.records import corrupt, pack_dir
from urbanseg.data import tfrecord as records
from urbanseg.data.loader import EpochSampler, ShardDataset, build_loader, sample_seed
from urbanseg.errors import UserError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    prepared, out = pack_dir(tmp_path_factory.mktemp("data"), {"train": 11, "val": 4}, shards=3)
    return prepared, out


def test_items_equal_the_prepared_files(shards):
    prepared, out = shards
    ds = ShardDataset(out, "train")
    assert len(ds) == 11 and ds.label_set.num_classes == 8 and ds.spec.data_length == 11
    for i in (0, 5, 10, -1):
        item = ds[i]
        assert item["id"] == i % 11
        city = item["name"].split("_")[0]
        image = cv2.imread(str(prepared / "images" / "train" / city / f"{item['name']}.png"))[..., ::-1]
        label = cv2.imread(str(prepared / "labels" / "train" / city / f"{item['name']}.png"), cv2.IMREAD_UNCHANGED)
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 32)
        assert item["label"].dtype == torch.uint8 and item["label"].shape == (16, 32)
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), image)
        assert np.array_equal(item["label"].numpy(), label)
    with pytest.raises(IndexError):
        ds[11]


@pytest.mark.parametrize("size, world_size", [(11, 1), (11, 3), (10, 4), (3, 4)])
def test_ranks_cover_every_index_once(size, world_size):
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            s = EpochSampler(size, seed=7, rank=rank, world_size=world_size)
            s.set_epoch(epoch)
            keys = list(s)
            assert len(keys) == len(s)
            seen += [i for i, _ in keys]
        assert sorted(seen) == list(range(size))


def test_epoch_order_is_deterministic_and_changes_per_epoch():
    a, b = EpochSampler(50, seed=1), EpochSampler(50, seed=1)
    b.set_epoch(0)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert [i for i, _ in a] != [i for i, _ in b]
    assert [i for i, _ in EpochSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]
    # the augmentation seed depends on (seed, epoch, index), not on the position or rank
    keys = dict(EpochSampler(50, seed=1, rank=1, world_size=2))
    assert all(keys[i] == sample_seed(1, 0, i) for i in keys)


def test_loader_union_over_ranks_and_workers_is_every_index_once(shards):
    _, out = shards
    ids = []
    for rank in range(2):
        loader = build_loader(out, "train", batch_size=2, train=True, workers=2, seed=3, rank=rank, world_size=2)
        ids += [i for batch in loader for i in batch["id"].tolist()]
    assert sorted(ids) == list(range(11))


def batches(loader):
    return [(b["id"].tolist(), b["image"].clone(), b["label"].clone(), list(b["name"])) for b in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for (ia, xa, ya, na), (ib, xb, yb, nb) in zip(a, b):
        assert ia == ib and na == nb and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augmented_batches_do_not_depend_on_workers_and_resume_exactly(shards):
    _, out = shards
    kw = dict(batch_size=2, train=True, seed=5, augment={"crop": (24, 12)})
    zero = build_loader(out, "train", workers=0, epoch=2, **kw)
    reference = batches(zero)
    assert reference[0][1].shape == (2, 3, 12, 24) and reference[0][2].dtype == torch.uint8
    two = build_loader(out, "train", workers=2, epoch=2, **kw)
    assert_same(batches(two), reference)
    # resume after 3 batches (6 samples) of epoch 2: the tail of the uninterrupted epoch
    resumed = build_loader(out, "train", workers=2, epoch=2, start=6, **kw)
    assert_same(batches(resumed), reference[3:])
    # the next epoch through the same (persistent-worker) loader equals a fresh loader's
    two.sampler.set_epoch(3)
    assert_same(batches(two), batches(build_loader(out, "train", workers=0, epoch=3, **kw)))
    assert [b[0] for b in batches(two)] != [b[0] for b in reference]


def test_eval_loader_keeps_order_and_pixels(shards):
    _, out = shards
    loader = build_loader(out, "val", batch_size=3, train=False, workers=0)
    got = batches(loader)
    assert [b[0] for b in got] == [[0, 1, 2], [3]]
    ds = ShardDataset(out, "val")
    assert torch.equal(got[0][1][1], ds[1]["image"]) and torch.equal(got[0][2][1], ds[1]["label"])


def test_corrupt_record_is_named_when_read(tmp_path):
    _, out = pack_dir(tmp_path, {"train": 6}, shards=2)
    ds = ShardDataset(out, "train")
    ds[4]  # opens the descriptor before the corruption: reads must still be checked
    shard = out / "train" / "00001-of-00002.tfrecord"
    offset = int(records.read_index(shard)[1, 0])
    corrupt(shard, "data", offset)
    where = rf"00001-of-00002\.tfrecord: record 1 at byte offset {offset}"
    with pytest.raises(records.CorruptRecordError, match=where):
        ds[4]
    assert ds[3]["id"] == 3
    corrupt(shard, "truncate", offset)
    with pytest.raises(records.CorruptRecordError, match=where):
        ShardDataset(out, "train")


def test_missing_split_index_and_count_mismatch(tmp_path):
    prepared, out = pack_dir(tmp_path, {"train": 4}, shards=2)
    with pytest.raises(UserError, match=r"no split 'val' .*found: \['train'\]"):
        ShardDataset(out, "val")
    with pytest.raises(UserError, match=r"is a prepared folder \(it has manifest.json\), not shards: pack it"):
        ShardDataset(prepared, "val")  # evaluate --data PREPARED said "found: nothing"
    shard = out / "train" / "00000-of-00002.tfrecord"
    records.index_path(shard).unlink()
    with pytest.raises(UserError, match=r"index .* is missing; rebuild it with urbanseg\.data\.tfrecord\.build_index"):
        ShardDataset(out, "train")
    records.build_index(shard)
    spec_path = out / "train" / "spec.json"
    spec_path.write_text(spec_path.read_text().replace('"data_length": 4', '"data_length": 5'))
    with pytest.raises(UserError, match="spec.json: `data_length` is 5 but the shards hold 4 records"):
        ShardDataset(out, "train")


def test_sampler_rejects_bad_arguments():
    with pytest.raises(UserError, match="rank"):
        EpochSampler(10, rank=2, world_size=2)
    with pytest.raises(UserError, match="start 6"):
        EpochSampler(10, world_size=2).set_epoch(0, start=6)


def test_workers_start_after_opencv_used_its_thread_pool(shards):
    """Regression: cv2.setNumThreads() in a forked worker hangs forever once the parent
    has used OpenCV's thread pool; the loader must not touch it (a timeout turns a
    hang into a failure)."""
    image = np.random.default_rng(0).integers(0, 255, (512, 1024, 3), np.uint8)
    for _ in range(3):
        cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
        cv2.resize(image, (700, 350))
    _, out = shards
    loader = build_loader(out, "train", batch_size=4, train=True, workers=2)
    loader.timeout = 60
    assert sorted(i for b in loader for i in b["id"].tolist()) == list(range(11))
