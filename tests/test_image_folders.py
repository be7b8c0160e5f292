"""Streaming image datasets (flatminima.data.folders / transforms) and the image continual sequences
(flatminima.continual.image_tasks), on tiny image folders written here in every layout."""

import gzip
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from flatminima import data  # noqa: E402
from flatminima.continual import image_tasks as it  # noqa: E402
from flatminima.continual.tasks import load_sequence  # noqa: E402
from flatminima.core.schedules import derive_seed  # noqa: E402
from flatminima.data import FolderDataset, ImageTransform, load_image_folder  # noqa: E402

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def color(label, i):
    """A class-dependent color (red = label, green = image number) so labels can be read off pixels."""
    return (10 * label, 7 * i, 200)


def write_image(path, label, i, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), color(label, i)).save(path, fmt)


def class_folders(root, counts, names=None):
    names = names or [f"c{k}" for k in range(len(counts))]
    for label, (name, n) in enumerate(zip(names, counts)):
        for i in range(n):
            write_image(root / name / f"{i:03d}.png", label, i)
    return root


def exact(ds_or_files, split="train"):
    """Labels read back from the pixels (red / 10) of every image, evaluation transform, mean 0, std 1."""
    files = getattr(ds_or_files, split) if isinstance(ds_or_files, FolderDataset) else ds_or_files
    return [int(round(files[i][0][0, 0, 0].item() * 255 / 10)) for i in range(len(files))]


# --------------------------------------------------------------------------------------------
# transforms


def test_eval_transform_is_the_hand_computed_center_crop_and_normalization():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)  # H=4, W=5
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    t = ImageTransform(2, False, mean, std, resize_ratio=0.5)  # shorter side round(2/0.5) = 4: no resize
    assert t.eval_size(5, 4) == (5, 4)
    out = t(Image.fromarray(array))
    # top = round((4-2)/2) = 1, left = round((5-2)/2) = round(1.5) = 2
    want = (array[1:3, 2:4].astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    np.testing.assert_allclose(out.permute(1, 2, 0).double().numpy(), want, rtol=0, atol=1e-6)


def test_eval_transform_resizes_the_shorter_side_with_pil_bilinear():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))  # W=8, H=6
    t = ImageTransform(2, False, ZERO, ONE, resize_ratio=0.5)
    assert t.eval_size(8, 6) == (5, 4)  # short 4, long int(4·8/6) = 5
    resized = np.asarray(img.resize((5, 4), Image.Resampling.BILINEAR))
    want = resized[1:3, 2:4].astype(np.float32) / 255  # top round((4-2)/2) = 1, left round(1.5) = 2
    assert torch.equal(t(img), torch.from_numpy(want).permute(2, 0, 1))


def test_train_crops_respect_scale_and_ratio_and_fall_back_to_the_central_crop():
    t = ImageTransform(8, True, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    width, height = 37, 23
    for seed in range(200):
        top, left, h, w = t.crop_params(width, height, torch.Generator().manual_seed(seed))
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
        # w, h are rounded from sqrt(s·A·r), sqrt(s·A/r): some (w0, h0) within 0.5 meets the bounds
        assert (w - 0.5) * (h - 0.5) / (width * height) <= 0.6 and (w + 0.5) * (h + 0.5) / (width * height) >= 0.2
        assert (w - 0.5) / (h + 0.5) <= 2.0 and (w + 0.5) / (h - 0.5) >= 0.5
    never = ImageTransform(8, True, scale=(0.99, 1.0))  # a 400×10 strip: no square-ish box fits
    g = torch.Generator().manual_seed(0)
    assert never.crop_params(400, 10, g) == (0, (400 - 13) // 2, 10, 13)  # w = round(10·4/3)
    assert never.crop_params(10, 400, g) == ((400 - 13) // 2, 0, 13, 10)  # h = round(10/(3/4))


def test_train_transform_is_the_seeded_crop_resize_flip_and_leaves_the_global_rng_alone():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    t = ImageTransform(6, True, ZERO, ONE)
    state = torch.random.get_rng_state()
    outs = [t(img, torch.Generator().manual_seed(s)) for s in (5, 5, 6, 7, 8)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(outs[0], outs[1]) and not all(torch.equal(outs[0], o) for o in outs[2:])
    g = torch.Generator().manual_seed(5)
    top, left, h, w = t.crop_params(30, 20, g)
    crop = img.crop((left, top, left + w, top + h)).resize((6, 6), Image.Resampling.BILINEAR)
    if torch.rand(1, generator=g).item() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert torch.equal(outs[0], torch.from_numpy(np.asarray(crop).astype(np.float32) / 255).permute(2, 0, 1))


@pytest.mark.parametrize("kwargs, name", [({"size": 0}, "size"), ({"scale": (0.5, 0.2)}, "scale"),
                                          ({"ratio": (0, 1)}, "ratio"), ({"std": (1, 0, 1)}, "std"),
                                          ({"mean": (0, 0)}, "mean"), ({"resize_ratio": 1.5}, "resize_ratio")])
def test_transform_options_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        ImageTransform(**{"size": 4, "train": True, **kwargs})
    with pytest.raises(ValueError, match="Invalid generator"):
        ImageTransform(4, True)(Image.new("RGB", (8, 8)))


# --------------------------------------------------------------------------------------------
# layouts


def test_folder_layout_scans_sorted_classes_and_splits_each_class_with_the_seed(tmp_path):
    root = class_folders(tmp_path / "r", [5, 6, 1], ["b", "a", "c"])  # sorted: a(6) b(5) c(1)
    write_image(root / "a" / "upper.JPG", 0, 99, "JPEG")
    (root / "a" / ".hidden.png").write_bytes(b"x")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / ".git").mkdir()
    paths, labels, classes = data.scan_image_folder(root)
    assert classes == ["a", "b", "c"] and labels == [0] * 7 + [1] * 5 + [2]
    assert paths[:7] == [f"a/{i:03d}.png" for i in range(6)] + ["a/upper.JPG"]
    ds = load_image_folder(root, image_size=12, mean=ZERO, std=ONE, resize_ratio=1.0, split_seed=3)
    # per class k = min(n - 1, floor(0.2 n + 1/2)): 7 -> 1, 5 -> 1, 1 -> 0
    assert torch.bincount(ds.y_test, minlength=3).tolist() == [1, 1, 0]
    g, test = torch.Generator().manual_seed(3), []
    for c, members in enumerate([list(range(7)), list(range(7, 12)), [12]]):
        k = min(len(members) - 1, math.floor(0.2 * len(members) + 0.5))
        test += [members[i] for i in torch.randperm(len(members), generator=g)[:k].tolist()]
    assert list(ds.test.items) == [paths[i] for i in sorted(test)]
    train_paths = [ds.train.items[i] for i in ds.train.index]
    assert sorted(train_paths + [paths[i] for i in test]) == sorted(paths) and train_paths == sorted(train_paths)
    assert ds.class_names == classes and ds.num_classes == 3 and ds.input_shape == (3, 12, 12)
    assert ds.y_train.tolist() == [labels[paths.index(p)] for p in train_paths]
    assert load_image_folder(root, image_size=12, split_seed=3).test.items == ds.test.items
    assert any(load_image_folder(root, image_size=12, split_seed=s).test.items != ds.test.items for s in range(4, 10))


def test_folder_layout_errors_name_the_root(tmp_path):
    root = class_folders(tmp_path / "r", [2, 2])
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="'empty' holds none") as info:
        data.scan_image_folder(root)
    assert str(root) in str(info.value)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="it has none"):
        data.scan_image_folder(tmp_path / "none")
    for layout, expected in (("folder", "root/<class>/<image>"), ("cub", "image_class_labels.txt"),
                             ("split_file", "_train.txt"), ("cifar100", "cifar-100-python")):
        with pytest.raises(ValueError, match="Invalid root") as info:
            load_image_folder(tmp_path / "missing", layout)
        assert expected in str(info.value)
    with pytest.raises(ValueError, match="Invalid layout"):
        load_image_folder(root, "zip")
    with pytest.raises(ValueError, match="Invalid split_name"):
        load_image_folder(root, "folder", split_name="a")


def test_train_test_layout(tmp_path):
    root = tmp_path / "cars"
    class_folders(root / "train", [3, 2])
    class_folders(root / "test", [1, 2])
    ds = load_image_folder(root, "train_test", image_size=12, mean=ZERO, std=ONE, resize_ratio=1.0)
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1] and ds.y_test.tolist() == [0, 1, 1]
    assert exact(ds, "train") == ds.y_train.tolist() and exact(ds, "test") == ds.y_test.tolist()
    assert ds.test.items[0] == "test/c0/000.png"
    class_folders(root / "test", [1, 1, 1])
    with pytest.raises(ValueError, match="not in both: \\['c2'\\]"):
        load_image_folder(root, "train_test")


def test_cub_layout_reads_the_id_files_with_one_based_labels(tmp_path):
    root = tmp_path / "CUB_200_2011"
    rows = [(1, "002.b/x1.jpg", 2, 1), (2, "001.a/x2.jpg", 1, 0), (3, "001.a/x3.jpg", 1, 1), (10, "002.b/x4.jpg", 2, 0)]
    for i, path, label, _ in rows:
        write_image(root / "images" / path, label - 1, i, "JPEG")
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows[::-1]))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {s}\n" for i, _, _, s in rows) + "\n")
    (root / "classes.txt").write_text("2 002.b\n1 001.a\n")
    ds = load_image_folder(tmp_path, "cub", image_size=12)  # the parent of CUB_200_2011 is found too
    assert ds.class_names == ["001.a", "002.b"] and ds.source == str(root)
    assert ds.y_train.tolist() == [1, 0] and ds.y_test.tolist() == [0, 1]
    assert list(ds.train.items[i] for i in ds.train.index) == ["images/002.b/x1.jpg", "images/001.a/x3.jpg"]
    (root / "image_class_labels.txt").write_text("1 2\n2 1\n3 1\n10 3\n")
    with pytest.raises(ValueError, match="labels in 1..2"):
        load_image_folder(root, "cub")


def test_split_file_layout_pools_the_named_splits(tmp_path):
    root = tmp_path / "domainnet"
    lines = {"real_train": [("real/cat/1.png", 1), ("real/ant/2.png", 0)], "real_test": [("real/cat/3.png", 1)],
             "clip_train": [("clip/dog/1.png", 2)], "clip_test": [("clip/ant/2.png", 0), ("clip/dog/3.png", 2)]}
    for name, items in lines.items():
        for path, label in items:
            write_image(root / path, label, 0)
        (root / f"{name}.txt").write_text("".join(f"{p} {c}\n" for p, c in items))
    ds = load_image_folder(root, "split_file", image_size=12, mean=ZERO, std=ONE, resize_ratio=1.0)
    assert ds.y_train.tolist() == [2, 1, 0] and ds.y_test.tolist() == [0, 2, 1]  # clip before real
    assert ds.class_names == ["ant", "cat", "dog"] and exact(ds) == [2, 1, 0]
    only = load_image_folder(root, "split_file", split_name="real", image_size=12)
    assert only.y_train.tolist() == [1, 0] and only.num_classes == 2
    with pytest.raises(ValueError, match="nope_train.txt"):
        load_image_folder(root, "split_file", split_name=["nope"])


def write_cifar100(root, per_class=1, classes=100, test_per_class=1):
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for part, n in (("train", per_class), ("test", test_per_class)):
        labels = [c for c in range(classes) for _ in range(n)]
        rows = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(base / part, "wb") as f:  # the official files: python-2 pickles with byte-string keys
            pickle.dump({b"data": rows, b"fine_labels": labels, b"coarse_labels": [c // 5 for c in labels],
                         b"filenames": [b"x.png"] * len(labels)}, f, protocol=2)
        out[part] = rows, labels
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"n{c}".encode() for c in range(classes)]}, f, protocol=2)
    return out


def test_cifar100_layout_decodes_the_pickled_rows(tmp_path):
    arrays = write_cifar100(tmp_path, per_class=2, classes=3)
    ds = load_image_folder(tmp_path, "cifar100", image_size=32, mean=ZERO, std=ONE, resize_ratio=1.0)
    rows, labels = arrays["train"]
    assert ds.y_train.tolist() == labels and ds.class_names == ["n0", "n1", "n2"]
    for i in (0, 5):
        want = torch.from_numpy(rows[i].reshape(3, 32, 32).astype(np.float32) / 255)
        assert torch.equal(ds.train[i][0], want)  # R, G, B planes of 1024 values, row-major


# --------------------------------------------------------------------------------------------
# FolderDataset: loaders, select / subset, fingerprint


@pytest.fixture
def folder(tmp_path):
    return load_image_folder(class_folders(tmp_path / "r", [6, 5, 7]), image_size=8, test_fraction=0.25)


def test_train_loader_is_the_same_for_any_number_of_workers(folder):
    def epochs(workers):
        g = torch.Generator().manual_seed(11)
        loader = FolderDataset(**{**vars(folder), "workers": workers}).train_loader(4, g)
        batches = [(x, y) for _ in range(2) for x, y in loader]
        return batches, g.get_state()

    state = torch.random.get_rng_state()
    (zero, g0), (two, g2) = epochs(0), epochs(2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(g0, g2) and len(zero) == 2 * (len(folder.train) // 4)
    for (x0, y0), (x2, y2) in zip(zero, two):
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and x0.dtype == torch.float32 and y0.dtype == torch.long
    assert not torch.equal(zero[0][1], zero[len(zero) // 2][1]) or not torch.equal(zero[0][0], zero[len(zero) // 2][0])
    # the pairs: a permutation, then one int per epoch; sample i augmented with derive_seed(e, i)
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(len(folder.train), generator=g).tolist()
    e = int(torch.randint(0, 2 ** 62, (1,), generator=g).item())
    first = torch.stack([folder.train[(i, derive_seed(e, i))][0] for i in perm[:4]])
    assert torch.equal(zero[0][0], first) and zero[0][1].tolist() == folder.y_train[perm[:4]].tolist()


def test_eval_loaders_test_batch_select_and_subset(folder):
    xs, ys = zip(*folder.eval_train_loader(5))
    assert torch.equal(torch.cat(xs), torch.stack([folder.train[i][0] for i in range(len(folder.train))]))
    assert torch.equal(torch.cat(ys), folder.y_train)
    xt, yt = folder.test_batch(3)
    assert torch.equal(xt, torch.cat([x for x, _ in folder.test_loader(2)])[:3])
    assert torch.equal(yt, folder.y_test[:3]) and folder.to("cpu") is folder
    part = folder.select(torch.tensor([4, 0]), torch.tensor([1]))
    assert part.y_train.tolist() == [folder.y_train[4], folder.y_train[0]] and len(part.test) == 1
    assert torch.equal(part.train[0][0], folder.train[4][0])
    sub = folder.subset(5, seed=2)
    idx = torch.randperm(len(folder.y_train), generator=torch.Generator().manual_seed(2))[:5]
    assert torch.equal(sub.y_train, folder.y_train[idx]) and sub.test is folder.test
    with pytest.raises(ValueError, match="Invalid train_idx"):
        folder.select(torch.tensor([99]), None)
    with pytest.raises(ValueError, match="Invalid batch_size"):
        folder.train_loader(100, torch.Generator())


def test_fingerprint_changes_when_a_file_or_a_label_changes(tmp_path):
    root = class_folders(tmp_path / "r", [3, 3])
    first = load_image_folder(root, image_size=8).fingerprint()
    assert load_image_folder(root, image_size=8).fingerprint() == first
    write_image(root / "c1" / "001.png", 5, 5)
    changed = load_image_folder(root, image_size=8).fingerprint()
    assert changed != first
    os.rename(root / "c1" / "001.png", root / "c0" / "009.png")
    assert load_image_folder(root, image_size=8).fingerprint() not in (first, changed)
    arrays = tmp_path / "c"
    write_cifar100(arrays, classes=2)
    a = load_image_folder(arrays, "cifar100", image_size=8).fingerprint()
    assert a == load_image_folder(arrays, "cifar100", image_size=8).fingerprint()
    assert a != load_image_folder(arrays, "cifar100", image_size=16).fingerprint()


# --------------------------------------------------------------------------------------------
# class-incremental splits and sequences


def test_class_incremental_split_keeps_the_remainder_as_a_last_task():
    assert it.class_incremental_split(7, 3, 2) == [[0, 1, 2], [3, 4], [5, 6]]
    assert [len(g) for g in it.class_incremental_split(10, 4, 4)] == [4, 4, 2]
    cars = it.class_incremental_split(196, 16, 20)
    assert [len(g) for g in cars] == [16] + [20] * 9 and sorted(sum(cars, [])) == list(range(196))
    order = torch.randperm(7, generator=torch.Generator().manual_seed(5)).tolist()
    assert it.class_incremental_split(7, 3, 2, 5) == [sorted(order[:3]), sorted(order[3:5]), sorted(order[5:])]
    assert it.make_class_order(7, 5) == order and it.make_class_order(7) == list(range(7))
    assert it.class_incremental_split(4, 1, 3, class_order=[3, 1, 0, 2]) == [[3], [0, 1, 2]]
    for args, name in (((7, 0, 2), "init_cls"), ((7, 8, 2), "init_cls"), ((7, 3, 0), "increment"),
                       ((7, 3, 2, -1), "class_order_seed")):
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            it.class_incremental_split(*args)
    with pytest.raises(ValueError, match="a permutation of 0..3"):
        it.class_incremental_split(4, 1, 1, class_order=[0, 1, 1, 2])


def test_image_folder_sequence_saves_its_class_order_and_caps_per_class(tmp_path):
    root = class_folders(tmp_path / "r", [6] * 7)
    kw = dict(init_cls=3, increment=2, image_size=12, mean=ZERO, std=ONE, resize_ratio=1.0, augment=False)
    seq = load_sequence("image_folder", root=str(root), class_order_seed=4, **kw)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(4)).tolist()
    assert seq.class_order == order and seq.scenario == "class" and seq.num_classes == 7 and len(seq) == 3
    assert [t.classes for t in seq] == [sorted(order[:3]), sorted(order[3:5]), sorted(order[5:])]
    for task in seq:
        assert set(task.data.y_train.tolist()) == set(task.classes) == set(task.data.y_test.tolist())
        assert exact(task.data) == task.data.y_train.tolist()  # global labels, read from the pixels
    again = load_sequence("image_folder", root=str(root), class_order_seed=4, **kw)
    assert [t.data.y_train.tolist() for t in again] == [t.data.y_train.tolist() for t in seq]
    capped = it.load_image_folder_sequence(str(root), train_per_class=2, test_per_class=1, **kw)
    other = it.load_image_folder_sequence(str(root), train_per_class=2, test_per_class=1, class_order=order, **kw)
    assert all(torch.bincount(t.data.y_train).max() == 2 for t in capped)
    assert all(torch.bincount(t.data.y_test)[t.classes].tolist() == [1] * len(t.classes) for t in capped)

    def kept(seq):  # (label, image file) kept per class, whatever the order
        return sorted((int(c), t.data.train.items[i]) for t in seq for c, i in zip(t.data.y_train, t.data.train.index))

    assert kept(capped) == kept(other)


def test_named_datasets_without_root_say_what_to_download(tmp_path):
    urls = {"imagenet_r": "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
            "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "cub": "https://data.caltech.edu/records/65de6-vhk29", "domainnet": "http://ai.bu.edu/M3SDA/",
            "cars": "Stanford Cars"}
    for name, url in urls.items():
        for root in (None, tmp_path / "missing"):
            with pytest.raises(ValueError, match="Invalid root") as info:
                load_sequence(name, root=root)
            assert url in str(info.value) and "--data-root" in str(info.value)
        assert url in it.dataset_instructions(name)
    with pytest.raises(ValueError, match="Invalid init_cls"):
        load_sequence("cars", root=None, init_cls=197)  # options before the root
    with pytest.raises(ValueError, match="cub with 200 classes \\(found 1\\)"):
        (tmp_path / "cub").mkdir()
        (tmp_path / "cub" / "images.txt").write_text("1 001.a/x.jpg\n")
        (tmp_path / "cub" / "image_class_labels.txt").write_text("1 1\n")
        (tmp_path / "cub" / "train_test_split.txt").write_text("1 1\n")
        write_image(tmp_path / "cub" / "images" / "001.a" / "x.jpg", 0, 0, "JPEG")
        load_sequence("cub", root=tmp_path / "cub")


def test_cifar100_sequence_end_to_end(tmp_path):
    write_cifar100(tmp_path, classes=100)
    seq = load_sequence("cifar100", root=tmp_path, image_size=8)
    assert len(seq) == 10 and seq.class_order == list(range(100)) and seq.input_shape == (3, 8, 8)
    assert seq.names[0] == "classes 0-9" and seq.tasks[3].data.y_train.tolist() == list(range(30, 40))
    assert seq.tasks[3].data.name == "cifar100/classes 30-39"


def test_domain_folders_share_one_label_space(tmp_path):
    for domain in ("photo", "art"):
        class_folders(tmp_path / "d" / domain, [3, 3])
    seq = load_sequence("domain_folders", root=tmp_path / "d", image_size=8, train_per_class=1)
    assert seq.names == ["art", "photo"] and seq.scenario == "domain" and seq.class_order is None
    assert [t.classes for t in seq] == [[0, 1], [0, 1]] and seq.tasks[0].data.y_train.tolist() == [0, 1]
    class_folders(tmp_path / "d" / "sketch", [3, 3, 3])
    with pytest.raises(ValueError, match="the same class folders as art"):
        load_sequence("domain_folders", root=tmp_path / "d", image_size=8)
    with pytest.raises(ValueError, match="Invalid domains"):
        load_sequence("domain_folders", root=tmp_path / "d", domains=["nope"])


# --------------------------------------------------------------------------------------------
# Fashion-MNIST as PNG folders


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_folder_matches_the_fashion_mnist_tensors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    raw = {"train_images": rng.integers(0, 256, (60, 28, 28)), "train_labels": rng.permutation(np.arange(60) % 10),
           "test_images": rng.integers(0, 256, (30, 28, 28)), "test_labels": np.arange(30) % 10}
    (tmp_path / "fm").mkdir()
    for key, name in data.FASHION_FILES.items():
        write_idx(tmp_path / "fm" / name, raw[key])
    monkeypatch.setenv(data.FASHION_ENV, str(tmp_path / "fm"))
    root = data.export_fashion_folder(per_class_train=3, per_class_test=2)
    assert root == tmp_path / "cache" / "flatminima" / "fashion_mnist_folder-train3-test2"
    stamp = (root / "complete.json").stat().st_mtime_ns
    assert data.export_fashion_folder(per_class_train=3, per_class_test=2) == root
    assert (root / "complete.json").stat().st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    fashion = data.load_fashion_mnist(fetch=False)
    seq = load_sequence("fashion_folder", train_per_class=3, test_per_class=2, image_size=28, mean=ZERO, std=ONE)
    assert [t.classes for t in seq] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]] and seq.input_shape == (3, 28, 28)
    u = raw["train_images"].astype(np.float64) / 255
    mean, std = u.mean(), u.std(ddof=1)
    for task in seq:
        files = task.data.train
        assert len(files) == 6
        for pos in range(len(files)):
            index = int(files.items[files.index[pos]].rsplit("/", 1)[1][:-4])  # <index>.png
            x, label = files[pos]
            assert label == int(fashion.y_train[index]) == raw["train_labels"][index]
            want = torch.from_numpy(raw["train_images"][index].astype(np.uint8)).float().div_(255.0)
            assert torch.equal(x, want.expand(3, 28, 28))
            assert torch.allclose((x[:1].double() - mean) / std, fashion.x_train[index].double(), atol=1e-5)
        first = [int(i) for i in np.flatnonzero(np.isin(raw["train_labels"], task.classes))]
        kept = sorted(int(files.items[i].rsplit("/", 1)[1][:-4]) for i in files.index)
        assert kept == sorted(sum(([i for i in first if raw["train_labels"][i] == c][:3] for c in task.classes), []))
        assert task.data.y_test.tolist() == [task.classes[0]] * 2 + [task.classes[1]] * 2
