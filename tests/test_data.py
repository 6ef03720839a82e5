"""Tests of pyengine.data: label noise, splits, readers (on fake folders), loaders, errors."""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pyengine.data import (
    DatasetCorruptError,
    DatasetNotFoundError,
    ImageTransform,
    apply_label_noise,
    build_dataset,
    build_loaders,
    read_cifar_batch,
    read_idx,
)
from pyengine.data import sources


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(autouse=True)
def _isolated_search_path(tmp_path_factory, monkeypatch):
    """No test may find (or download into) a real dataset on this machine."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.delenv("PYENGINE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.chdir(home)
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", home / "no-system-copy")


# --------------------------------------------------------------------------- label noise

@pytest.mark.parametrize("n,eps", [(1000, 0.1), (1000, 0.2), (999, 0.5), (37, 0.3), (10, 1.0)])
def test_label_noise_exact_count_and_all_different(n, eps):
    targets = torch.arange(n) % 10
    noisy, idx = apply_label_noise(targets, 10, eps, seed=3)
    assert idx.numel() == round(eps * n)
    assert torch.equal(idx, idx.unique())  # sorted, no repeats
    assert (noisy[idx] != targets[idx]).all()
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(noisy[keep], targets[keep])
    assert torch.equal(targets, torch.arange(n) % 10)  # the input is left alone
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10


def test_label_noise_deterministic_and_seeded():
    targets = np.random.default_rng(0).integers(0, 10, 500)
    a = apply_label_noise(targets, 10, 0.2, seed=7)
    b = apply_label_noise(targets.tolist(), 10, 0.2, seed=7)
    c = apply_label_noise(targets, 10, 0.2, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    noisy, idx = apply_label_noise(targets, 10, 0.0, seed=7)
    assert idx.numel() == 0 and torch.equal(noisy, torch.as_tensor(targets))


def test_label_noise_new_class_is_uniform_over_the_others():
    targets = torch.zeros(20_000, dtype=torch.int64)
    noisy, idx = apply_label_noise(targets, 5, 1.0, seed=0)
    counts = torch.bincount(noisy, minlength=5)
    assert counts[0] == 0
    assert ((counts[1:].float() / 5_000 - 1).abs() < 0.06).all()


def test_label_noise_rejects_bad_input():
    with pytest.raises(ValueError):
        apply_label_noise([0, 1, 2], 3, 1.5, 0)
    with pytest.raises(ValueError):
        apply_label_noise([0, 1, 5], 3, 0.5, 0)


# --------------------------------------------------------------------------- digits

def test_digits_shapes_classes_and_splits():
    b = build_dataset("digits", val_fraction=0.1, seed=0)
    info = b.info
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 32)
    assert info.num_train + info.num_val + info.num_test == 1797
    assert info.num_test == round(0.2 * 1797)
    assert info.num_val == round(0.1 * (1797 - info.num_test))
    x, y = b.train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert set(b.test.targets.tolist()) == set(range(10))
    # normalised with the training statistics
    xs = torch.stack([b.train[i][0] for i in range(len(b.train))])
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.1
    # train and validation are disjoint parts of the same pool
    assert not set(b.train.indices.tolist()) & set(b.val.indices.tolist())

    small = build_dataset("digits", image_size=8, normalize=False)
    x8, _ = small.test[0]
    assert x8.shape == (1, 8, 8) and 0.0 <= x8.min() and x8.max() <= 1.0
    from sklearn.datasets import load_digits
    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16
    # at the native size the pixels are the scikit-learn ones, unchanged
    assert any(torch.allclose(x8[0], raw[i]) for i in range(len(raw)))


def test_digits_noise_on_train_only_and_deterministic():
    a = build_dataset("digits", noise=0.2, seed=5, val_fraction=0.1)
    b = build_dataset("digits", noise=0.2, seed=5, val_fraction=0.1)
    c = build_dataset("digits", noise=0.2, seed=6, val_fraction=0.1)
    tr = a.train
    assert tr.noisy_indices.numel() == round(0.2 * len(tr)) == a.info.noisy_indices.numel()
    assert (tr.targets[tr.noisy_indices] != tr.clean_targets[tr.noisy_indices]).all()
    assert tr.noisy_mask.sum() == tr.noisy_indices.numel()
    assert torch.equal(tr.targets[~tr.noisy_mask], tr.clean_targets[~tr.noisy_mask])
    assert torch.equal(a.train.targets, b.train.targets)
    assert torch.equal(a.val.indices, b.val.indices)
    assert not torch.equal(a.train.noisy_indices, c.train.noisy_indices)
    # test and validation labels stay clean; the test split does not depend on the seed
    clean = build_dataset("digits", seed=6)
    assert torch.equal(a.test.targets, clean.test.targets)
    assert a.val.noisy_indices.numel() == 0 and torch.equal(a.val.targets, a.val.clean_targets)
    assert tr[int(tr.noisy_indices[0])][1] == int(tr.targets[tr.noisy_indices[0]])


def test_augmentation_random_crop_and_flip():
    img = torch.arange(3 * 32 * 32, dtype=torch.float32).view(3, 32, 32) / (3 * 32 * 32)
    plain = ImageTransform(32, (0.0,) * 3, (1.0,) * 3, augment=False)
    aug = ImageTransform(32, (0.0,) * 3, (1.0,) * 3, augment=True)
    assert aug.padding == 4
    torch.testing.assert_close(plain(img), img)
    torch.manual_seed(0)
    outs = [aug(img) for _ in range(40)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(o, img) for o in outs)
    assert any(torch.equal(o, img.flip(-1)) or (o == 0).any() for o in outs)
    # every augmented view is a shifted (maybe mirrored) window of the zero-padded image
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    for o in outs[:10]:
        windows = [padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(o, w) or torch.equal(o, w.flip(-1)) for w in windows)
    b = build_dataset("digits", augment=True, noise=0.1)
    assert b.train.transform.augment and not b.test.transform.augment
    plain = b.train.with_transform(b.test.transform)  # e.g. for entropy on un-augmented data
    assert plain.source is b.train.source and torch.equal(plain.targets, b.train.targets)
    assert torch.equal(plain.noisy_indices, b.train.noisy_indices)
    assert torch.equal(plain[3][0], plain[3][0])


# --------------------------------------------------------------------------- CIFAR

def _write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], key: bytes) -> None:
    # The real files are Python 2 pickles (protocol 2) of a dict with byte-string keys and
    # data uint8 N x 3072, written by numpy 1.x, whose arrays name numpy.core.multiarray.
    entry = {b"batch_label": b"fake batch", key: labels, b"data": data,
             b"filenames": [b"img%d.png" % i for i in range(len(labels))]}
    raw = pickle.dumps(entry, protocol=2)
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _fake_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _write_cifar_batch(folder / name, data, labels, b"labels")
        all_data.append(data)
        all_labels.append(labels)
    meta = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                             b"frog", b"horse", b"ship", b"truck"], b"num_cases_per_batch": 3}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return np.concatenate(all_data), sum(all_labels, [])


def test_fake_cifar10_reads_correctly(tmp_path):
    data, labels = _fake_cifar10(tmp_path)
    b = build_dataset("cifar10", root=tmp_path, normalize=False)
    assert (b.info.num_classes, b.info.in_channels, b.info.image_size) == (10, 3, 32)
    assert b.info.classes[0] == "airplane" and b.info.classes[9] == "truck"
    assert len(b.train) == 15 and len(b.test) == 3
    assert b.train.targets.tolist() == labels[:15]
    assert b.test.targets.tolist() == labels[15:]
    # pixel (c, h, w) of image n is byte c*1024 + h*32 + w of row n
    x, y = b.train[4]
    assert y == labels[4]
    expected = torch.from_numpy(data[4].astype(np.float32) / 255).view(3, 32, 32)
    torch.testing.assert_close(x, expected)
    assert x[1, 2, 5].item() == pytest.approx(data[4, 1024 + 2 * 32 + 5] / 255)
    # the folder itself may be given as root, and images resize on request
    b16 = build_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", image_size=16)
    assert b16.test[0][0].shape == (3, 16, 16)


def test_fake_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 6), ("test", 2)):
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": [99, 0, 5, 42, 7, 1][:n], b"coarse_labels": [0] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    b = build_dataset("cifar-100", root=tmp_path)
    assert b.info.num_classes == 100
    assert b.train.targets.tolist() == [99, 0, 5, 42, 7, 1]
    assert b.test.targets.tolist() == [99, 0]


def test_corrupt_or_malicious_cifar_is_refused(tmp_path):
    _fake_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])  # truncated
    with pytest.raises(DatasetCorruptError, match="data_batch_3"):
        build_dataset("cifar10", root=tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DatasetCorruptError, match="refusing"):
        read_cifar_batch(evil)
    assert issubclass(DatasetCorruptError, DatasetNotFoundError)

    # a batch re-saved with pickle protocol 4 or 5 (5 stores arrays through numpy's _frombuffer) loads
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for proto in (4, 5):
        (tmp_path / f"p{proto}").write_bytes(pickle.dumps({b"data": data, b"labels": [3, 1]}, protocol=proto))
        images, labels = read_cifar_batch(tmp_path / f"p{proto}")
        assert torch.equal(images, torch.from_numpy(data).view(2, 3, 32, 32)) and labels.tolist() == [3, 1]


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)

def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_fake_fashion_mnist_idx_gzip_and_plain(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(2)
    tr_x = rng.integers(0, 256, (12, 28, 28)).astype(np.uint8)
    tr_y = np.arange(12) % 10
    te_x = rng.integers(0, 256, (4, 28, 28)).astype(np.uint8)
    te_y = np.array([3, 1, 4, 1])
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(tr_x)))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(tr_y)))
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(te_x))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(te_y))
    b = build_dataset("fashion-mnist", root=tmp_path, normalize=False, noise=0.5, seed=1)
    assert (b.info.num_classes, b.info.in_channels, b.info.image_size) == (10, 1, 28)
    assert b.info.source == str(folder)
    assert b.train.clean_targets.tolist() == tr_y.tolist()
    assert b.train.noisy_indices.numel() == 6
    assert b.test.targets.tolist() == te_y.tolist()
    torch.testing.assert_close(b.test[2][0][0], torch.from_numpy(te_x[2]).float() / 255)
    assert torch.equal(read_idx(folder / "train-labels-idx1-ubyte.gz"), torch.from_numpy(
        tr_y.astype(np.uint8)))
    assert build_dataset("fmnist", root=tmp_path, image_size=32).train[0][0].shape == (1, 32, 32)

    # labels outside the 10 classes are reported, with the file
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([3, 12, 4, 1])))
    with pytest.raises(DatasetCorruptError, match=r"(?s)test labels span \[1, 12\].*t10k-labels"):
        build_dataset("fashion-mnist", root=tmp_path)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(te_y))

    # a truncated file is reported as corrupt, with its path
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(te_x)[:-10])
    with pytest.raises(DatasetCorruptError, match="t10k-images"):
        build_dataset("fashion-mnist", root=tmp_path)


def test_not_found_error_lists_every_place_and_how_to_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("fashion-mnist", root=missing)
    e = err.value
    msg = str(e)
    assert str(missing) in msg and str(missing / "FashionMNIST" / "raw") in msg
    assert str(sources.FASHION_MNIST_SYSTEM_DIR) in msg
    assert "--data-dir" in msg and "--download" in msg
    assert "apt install dataset-fashion-mnist" in msg
    assert all(p in msg for p in e.looked) and len(e.looked) >= 5
    assert isinstance(e, FileNotFoundError)

    for name, marker in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                         ("tiny-imagenet", "tiny-imagenet-200")):
        with pytest.raises(DatasetNotFoundError) as err:
            build_dataset(name, root=missing)
        msg = str(err.value)
        assert str(missing / marker) in msg and "--download" in msg and "--data-dir" in msg
    with pytest.raises(KeyError):
        build_dataset("mnist-but-wrong")


# --------------------------------------------------------------------------- Tiny-ImageNet

def _save_jpeg(path: Path, colour: tuple[int, int, int], size: int = 64) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, quality=95)


def test_fake_tiny_imagenet_reads_correctly(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish\nn01629819\tsalamander\n")
    for w, c in zip(wnids, colours):
        for i in range(2):
            _save_jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", c)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    val = [("val_0.JPEG", 2), ("val_1.JPEG", 0), ("val_2.JPEG", 1), ("val_3.JPEG", 2)]
    lines = []
    for fname, k in val:
        _save_jpeg(root / "val" / "images" / fname, colours[k])
        lines.append(f"{fname}\t{wnids[k]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _save_jpeg(root / "test" / "images" / "test_0.JPEG", (9, 9, 9))  # unlabelled, ignored

    b = build_dataset("tiny-imagenet", root=tmp_path, normalize=False)
    assert (b.info.num_classes, b.info.in_channels, b.info.image_size) == (3, 3, 64)
    assert b.info.classes[:2] == ["goldfish", "salamander"] and b.info.classes[2] == wnids[2]
    assert len(b.train) == 6 and len(b.test) == 4
    assert b.train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert b.test.targets.tolist() == [2, 0, 1, 2]
    for ds in (b.train, b.test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 64, 64)
            assert int(x.mean(dim=(1, 2)).argmax()) == y  # the class's colour survived
    small = build_dataset("tiny-imagenet", root=root, image_size=32, in_memory=True,
                          val_fraction=0.5, augment=True)
    assert small.train[0][0].shape == (3, 32, 32) and len(small.val) == 3

    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetCorruptError, match="val_annotations"):
        build_dataset("tiny-imagenet", root=tmp_path)


def test_image_folder(tmp_path):
    for cls, c in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
        for i in range(5):
            _save_jpeg(tmp_path / "imgs" / cls / f"{i}.jpg", c, size=20)
    b = build_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=16, test_fraction=0.4)
    assert b.info.classes == ["cat", "dog"] and b.info.num_classes == 2
    assert len(b.train) == 6 and len(b.test) == 4
    assert b.train[0][0].shape == (3, 16, 16)
    with pytest.raises(DatasetNotFoundError):
        build_dataset(f"imagefolder:{tmp_path / 'nothing'}")
    # a corrupt image is found up front, named, and skipped (not after a full epoch)
    (tmp_path / "imgs" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        b2 = build_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=16, test_fraction=0.4)
    assert len(b2.train) + len(b2.test) == 10
    for ds in (b2.train, b2.test):
        for i in range(len(ds)):
            ds[i]
    # a cut-off JPEG (valid header, scan data missing) passes PIL's verify: found by its missing
    # end-of-image marker and a decode; a whole JPEG with bytes after its marker is kept
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()).save(buf, "JPEG")
    good = buf.getvalue()  # mostly scan data: half of it keeps every header whole
    (tmp_path / "imgs" / "cat" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "imgs" / "cat" / "tail.jpg").write_bytes(good + b"trailing metadata")
    with pytest.warns(RuntimeWarning, match="skipping 2 unreadable") as rec:
        b3 = build_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=16, test_fraction=0.4)
    assert "cut.jpg" in str(rec[0].message) and "tail.jpg" not in str(rec[0].message)
    assert len(b3.train) + len(b3.test) == 11
    for ds in (b3.train, b3.test):
        for i in range(len(ds)):
            ds[i]


# --------------------------------------------------------------------------- loaders

def test_loaders_batches_and_seeded_order():
    b = build_dataset("digits", val_fraction=0.1)
    l1 = build_loaders(b, batch_size=32, seed=3)
    l2 = build_loaders(b, batch_size=32, seed=3)
    x, y = next(iter(l1.train))
    assert x.shape == (32, 1, 32, 32) and y.shape == (32,) and y.dtype == torch.int64
    assert torch.equal(y, next(iter(l2.train))[1])
    assert sum(len(yb) for _, yb in l1.test) == len(b.test)
    assert sum(len(yb) for _, yb in l1.val) == len(b.val)
    no_val = build_loaders((b.train, b.test), batch_size=64)
    assert no_val.val is None


def test_distributed_loaders_shard_without_overlap():
    b = build_dataset("digits", val_fraction=0.1)
    shards = [build_loaders(b, 16, distributed=True, seed=0, num_replicas=2, rank=r)
              for r in range(2)]
    train = [list(s.train.sampler) for s in shards]
    assert not set(train[0]) & set(train[1])
    assert len(set(train[0]) | set(train[1])) == len(b.train)
    tests = [list(s.test.sampler) for s in shards]
    assert sorted(tests[0] + tests[1]) == list(range(len(b.test)))  # no padding duplicates
    before = list(shards[0].train.sampler)
    shards[0].set_epoch(1)
    assert list(shards[0].train.sampler) != before
    with pytest.raises(RuntimeError, match="process group"):
        build_loaders(b, 16, distributed=True)


def test_loader_with_workers_replays_an_epoch_from_the_saved_generator():
    """A resumed run restores the training loader's generator and starts a fresh loader: with
    worker processes its next epoch must see the batches (order and augmentation) that the
    uninterrupted loader's next epoch sees. Persistent workers broke this: they keep the worker
    seeds drawn at the first epoch, and a fresh iterator draws new ones before the shuffle."""
    b = build_dataset("digits", image_size=8, augment=True)

    def epoch(loaders):
        return [(x.clone(), y.clone()) for x, y in loaders.train]

    first = build_loaders(b, 256, workers=2, seed=1)
    epoch(first)
    for _ in first.test:  # an evaluation between epochs, as a run does
        pass
    saved = first.train.generator.get_state()
    second = epoch(first)
    fresh = build_loaders(b, 256, workers=2, seed=1)
    fresh.train.generator.set_state(saved)
    replayed = epoch(fresh)
    assert len(second) == len(replayed)
    for (xa, ya), (xb, yb) in zip(second, replayed):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def _fake_tiny_folder(root: Path, per_class: int = 2) -> list[str]:
    wnids = ["n02", "n01", "n03"]
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w, c in zip(wnids, colours):
        for i in range(per_class):
            _save_jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", c, size=16)
    lines = []
    for i in range(6):
        _save_jpeg(root / "val" / "images" / f"val_{i}.JPEG", colours[i % 3], size=16)
        lines.append(f"val_{i}.JPEG\t{wnids[i % 3]}\t0\t0\t15\t15")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


def test_tiny_imagenet_download_is_checked_and_extracted_whole(tmp_path, monkeypatch):
    import hashlib
    import shutil
    import zipfile

    src = tmp_path / "src"
    _fake_tiny_folder(src / "tiny-imagenet-200")
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((src / "tiny-imagenet-200").rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    data = tmp_path / "data"

    # an archive that is not the official one (here: truncated) is refused and moved aside
    data.mkdir()
    (data / "tiny-imagenet-200.zip").write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(DatasetCorruptError, match="MD5"):
        sources.download_tiny_imagenet(data, url=archive.as_uri(), md5=md5)
    assert not (data / "tiny-imagenet-200.zip").exists() and (data / "tiny-imagenet-200.zip.bad").exists()
    assert not (data / "tiny-imagenet-200").exists()

    # an extraction killed half-way leaves no folder that could be read as the dataset
    real_extract = zipfile.ZipFile._extract_member

    def killed(self, member, *args):
        name = member if isinstance(member, str) else member.filename
        if "/val/" in name:
            raise KeyboardInterrupt
        return real_extract(self, member, *args)

    monkeypatch.setattr(zipfile.ZipFile, "_extract_member", killed)
    with pytest.raises(KeyboardInterrupt):
        sources.download_tiny_imagenet(data, url=archive.as_uri(), md5=md5)
    monkeypatch.setattr(zipfile.ZipFile, "_extract_member", real_extract)
    with pytest.raises(DatasetNotFoundError):
        build_dataset("tiny-imagenet", root=data)

    # the next call (the archive is there now) extracts it whole, and removes what processes killed
    # outright left (their names carry their ids; 999999999 runs nowhere)
    (data / ".tiny-imagenet-200.partial.999999999" / "tiny-imagenet-200").mkdir(parents=True)
    (data / "tiny-imagenet-200.zip.part.999999999").write_bytes(b"half a download")
    got = sources.download_tiny_imagenet(data, url=archive.as_uri(), md5=md5)
    assert got == data / "tiny-imagenet-200"
    assert sorted(p.name for p in data.iterdir()) == ["tiny-imagenet-200", "tiny-imagenet-200.zip",
                                                     "tiny-imagenet-200.zip.bad"]
    b = build_dataset("tiny-imagenet", root=data, normalize=False)
    assert len(b.train) == 6 and b.test.targets.tolist() == [0, 1, 2, 0, 1, 2]
    shutil.rmtree(src)


def test_incomplete_tiny_imagenet_is_refused_before_training(tmp_path):
    import shutil

    root = tmp_path / "tiny-imagenet-200"
    _fake_tiny_folder(root)
    (root / "val" / "images" / "val_4.JPEG").unlink()
    with pytest.raises(DatasetCorruptError, match=r"1 of the 6 validation images .* missing \(val_4.JPEG\)"):
        build_dataset("tiny-imagenet", root=tmp_path)
    _save_jpeg(root / "val" / "images" / "val_4.JPEG", (0, 250, 0), size=16)
    shutil.rmtree(root / "train" / "n03")  # a partial extraction: a class without images
    with pytest.raises(DatasetCorruptError, match=r"1 of the 3 classes .* no training images \(n03\)"):
        build_dataset("tiny-imagenet", root=tmp_path)


def test_unreadable_image_met_during_training_is_one_line(tmp_path, capsys):
    """An image that breaks after the listing (Tiny-ImageNet's are not decoded up front) stops the
    run with one line naming the file, also when a DataLoader worker met it."""
    from pyengine.cli import main
    from pyengine.data.errors import ImageReadError

    root = tmp_path / "tiny-imagenet-200"
    _fake_tiny_folder(root)
    bad = root / "train" / "n01" / "images" / "n01_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    b = build_dataset("tiny-imagenet", root=tmp_path)
    with pytest.raises(ImageReadError, match="n01_1.JPEG"):
        [b.train[i] for i in range(len(b.train))]
    rc = main(["prune", "--model", "resnet18", "--dataset", "tiny-imagenet", "--data-dir", str(tmp_path),
               "--image-size", "8", "--epochs", "1", "--rounds", "0", "--method", "imp", "--workers", "1",
               "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("pyengine: error: cannot read image ") and "n01_1.JPEG" in err[0]


def test_cifar_download_repairs_a_partial_extraction(tmp_path, monkeypatch):
    """A download or extraction killed half-way leaves the batch folder incomplete; with --download
    the next run has torchvision check and extract the archive again instead of stopping."""
    import torchvision.datasets as tvd

    data, labels = _fake_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    good = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "data_batch_4").unlink()
    (folder / "data_batch_5").write_bytes(good["data_batch_5"][:50])
    with pytest.raises(DatasetCorruptError, match="data_batch_4"):  # without --download: reported
        build_dataset("cifar10", root=tmp_path)

    calls = []

    class Extract:  # torchvision's CIFAR10(download=True), here without a network
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            for n, raw in good.items():
                (Path(root) / "cifar-10-batches-py" / n).write_bytes(raw)

    monkeypatch.setattr(tvd, "CIFAR10", Extract)
    b = build_dataset("cifar10", root=tmp_path, download=True, normalize=False)
    assert calls == [(str(tmp_path), True)]
    assert b.train.targets.tolist() == labels[:15] and b.test.targets.tolist() == labels[15:]
    torch.testing.assert_close(b.train[14][0], torch.from_numpy(data[14].astype(np.float32) / 255).view(3, 32, 32))
