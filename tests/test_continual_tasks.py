"""Continual-learning task sequences on fake offline data: split / permuted Fashion-MNIST (small
idx files) and the four VADER domains (a fake sdist and a tiny tokenizer)."""

import gzip
import io
import random
import re
import struct
import tarfile

import numpy as np
import pytest
import torch

from flatminima import data
from flatminima.continual import tasks as ct

N_TRAIN, N_TEST = 200, 100


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.VADER_ENV, raising=False)
    return tmp_path / "cache" / "flatminima"


@pytest.fixture
def fashion(tmp_path, cache, monkeypatch):
    """200 train / 100 test random 28×28 images, labels 0..9 (20 / 10 per class), found via the env var."""
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (N_TRAIN, 28, 28)), "train_labels": np.arange(N_TRAIN) % 10,
              "test_images": rng.integers(0, 256, (N_TEST, 28, 28)), "test_labels": np.arange(N_TEST) % 10}
    folder = tmp_path / "fm"
    folder.mkdir()
    for key, name in data.FASHION_FILES.items():
        write_idx(folder / name, arrays[key])
    monkeypatch.setenv(data.FASHION_ENV, str(folder))
    return data.load_fashion_mnist(fetch=False)


def rng_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def assert_same_rng(before):
    after = rng_states()
    assert torch.equal(before[0], after[0])
    assert all(np.array_equal(a, b) for a, b in zip(before[1], after[1])) and before[2] == after[2]


# --------------------------------------------------------------------------------------------
# helpers and the container


def test_stratified_subset_is_proportional_seeded_and_sorted():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(1))]
    idx = ct.stratified_subset(labels, 10, seed=3)
    assert idx.tolist() == sorted(set(idx.tolist())) and labels[idx].bincount().tolist() == [5, 3, 2]
    assert torch.equal(idx, ct.stratified_subset(labels, 10, seed=3))
    assert not torch.equal(idx, ct.stratified_subset(labels, 10, seed=4))
    assert labels[ct.stratified_subset(labels, 7, seed=0)].bincount().tolist() == [4, 2, 1]  # largest remainders
    assert torch.equal(ct.stratified_subset(labels, None), torch.arange(100))
    assert torch.equal(ct.stratified_subset(labels, 500), torch.arange(100))


def toy_sequence():
    def task(name, offset):
        x = torch.full((4, 3), float(offset))
        return ct.ContinualTask(name, data.Dataset(name, x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long),
                                                   2, (3,)), [0, 1])

    return ct.TaskSequence("toy", [task(n, i) for i, n in enumerate(["a", "b", "c", "d"])], 2, (3,), "domain")


def test_ordered_by_indices_names_and_subsets_with_validation():
    seq = toy_sequence()
    assert seq.ordered([3, 2, 1, 0]).names == ["d", "c", "b", "a"]
    assert seq.ordered(["c", "a", "d", "b"]).names == ["c", "a", "d", "b"]
    assert seq.ordered(np.array([1, 0])).names == ["b", "a"] and seq.ordered(("d",)).names == ["d"]
    assert seq.names == ["a", "b", "c", "d"] and len(seq) == 4  # not changed in place
    for bad in ([0, 0], [4], [-1], ["e"], [], "abcd", [True], [1.0], 3):
        with pytest.raises(ValueError, match="Invalid order"):
            seq.ordered(bad)
    with pytest.raises(ValueError, match="Invalid scenario: 'online'"):
        ct.TaskSequence("toy", [], 2, (3,), "online")
    moved = seq.to("cpu")
    assert moved.names == seq.names and torch.equal(moved.tasks[2].data.x_train, seq.tasks[2].data.x_train)


def test_registry_and_unknown_sequence_or_option():
    assert ct.available_sequences() == ["cars", "cifar100", "cub", "domain_folders", "domainnet", "fashion_folder",
                                        "image_folder", "imagenet_r", "permuted_fashion_mnist", "split_digits",
                                        "split_fashion_mnist", "vader"]
    assert ct.sequence_loader("Split-Fashion-MNIST") is ct.load_split_fashion_mnist
    with pytest.raises(ValueError, match="Invalid sequence: 'cifar'.*vader"):
        ct.load_sequence("cifar")
    with pytest.raises(ValueError, match="Invalid option for sequence 'vader': 'subset'.*train_subset"):
        ct.load_sequence("vader", subset=3)


def test_split_digits_is_the_bundled_split():
    from flatminima.data import load_digits

    base = load_digits()  # importing scikit-learn (once) draws from Python's `random`; the loader does not
    before = rng_states()
    seq = ct.load_sequence("split_digits", tasks=2, test_subset=20)
    assert [t.classes for t in seq.tasks] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and seq.scenario == "task"
    for task in seq.tasks:
        members = torch.isin(base.y_train, torch.tensor(task.classes))
        assert torch.equal(task.data.x_train, base.x_train[members]) and len(task.data.y_test) == 20
        assert set(task.data.y_test.tolist()) == set(task.classes)
    assert_same_rng(before)


@pytest.fixture
def no_data(monkeypatch):
    """Every way a loader reaches data (files, caches, fetches, the bundled digits) raises: a loader
    that gets past its checks fails the test instead of refusing the option."""
    def looked(*args, **kwargs):
        raise AssertionError("data was looked for before the options were checked")

    import sklearn.datasets

    for module, name in ((data.images, "find_fashion_mnist"), (data.text, "find_vader_archive"),
                         (data.text, "fetch_vader"), (data.text, "vader_sentences"), (data.text, "minilm_path"),
                         (data.images, "_prepared")):
        monkeypatch.setattr(module, name, looked)
    for name in ("load_fashion_mnist", "load_vader", "load_digits", "pixel_permutations"):
        monkeypatch.setattr(ct, name, looked)
    monkeypatch.setattr(sklearn.datasets, "load_digits", looked)


@pytest.mark.parametrize("name, options, arg", [
    ("split_fashion_mnist", {"tasks": 3}, "tasks"),
    ("split_fashion_mnist", {"tasks": 0}, "tasks"),
    ("split_fashion_mnist", {"train_subset": 0}, "train_subset"),
    ("split_fashion_mnist", {"test_subset": 2.5}, "test_subset"),
    ("split_fashion_mnist", {"class_order_seed": "x"}, "class_order_seed"),
    ("split_fashion_mnist", {"subset_seed": -1}, "subset_seed"),
    ("split_fashion_mnist", {"root": 3}, "root"),
    ("split_fashion_mnist", {"fetch": "no"}, "fetch"),
    ("split_digits", {"tasks": 4}, "tasks"),
    ("split_digits", {"train_subset": True}, "train_subset"),
    ("permuted_fashion_mnist", {"tasks": 0}, "tasks"),
    ("permuted_fashion_mnist", {"permutation_seed": -1}, "permutation_seed"),
    ("permuted_fashion_mnist", {"train_subset": True}, "train_subset"),
    ("permuted_fashion_mnist", {"fetch": None}, "fetch"),
    ("vader", {"domains": ["tweets", "imdb"]}, "domains"),
    ("vader", {"domains": "tweets"}, "domains"),
    ("vader", {"domains": ["nyt", "nyt"]}, "domains"),
    ("vader", {"domains": []}, "domains"),
    ("vader", {"max_length": 1}, "max_length"),
    ("vader", {"train_subset": -3}, "train_subset"),
    ("vader", {"test_subset": 0}, "test_subset"),
    ("vader", {"split_seed": None}, "split_seed"),
    ("vader", {"test_fraction": 1.0}, "test_fraction"),
    ("vader", {"tokenizer": 5}, "tokenizer"),
])
def test_bad_options_name_the_argument(cache, no_data, name, options, arg):
    """Refused before any data is looked for (no data is installed, every way to it raises), so a
    bad option fails the same on every machine."""
    value = next(iter(options.values()))
    with pytest.raises(ValueError, match="^" + re.escape(f"Invalid {arg}: {value!r} (expected")):
        ct.load_sequence(name, **options)


@pytest.mark.parametrize("task, options, arg", [
    ("fashion_mnist", {"subset": 0}, "subset"),
    ("fashion_mnist", {"subset": 2.0}, "subset"),
    ("fashion_mnist", {"fetch": "yes"}, "fetch"),
    ("fashion_mnist", {"root": 1.5}, "root"),
    ("vader_movies", {"domain": "imdb"}, "domain"),
    ("vader_movies", {"max_length": 1}, "max_length"),
    ("vader_movies", {"test_subset": 0}, "test_subset"),
    ("vader_movies", {"test_fraction": 0.0}, "test_fraction"),
    ("vader_movies", {"split_seed": -1}, "split_seed"),
    ("vader_movies", {"tokenizer": 7}, "tokenizer"),
    ("vader_movies", {"fetch": 1}, "fetch"),
    ("digits", {"test_size": 5}, "test_size"),
    ("digits", {"seed": True}, "seed"),
])
def test_task_loaders_check_options_before_looking_for_data(cache, no_data, task, options, arg):
    value = next(iter(options.values()))
    with pytest.raises(ValueError, match="^" + re.escape(f"Invalid {arg}: {value!r} (expected")):
        data.load_task(task, **options)


def test_data_finders_check_their_arguments_before_searching(cache):
    for find in (data.find_fashion_mnist, data.find_vader_archive):
        with pytest.raises(ValueError, match=re.escape("Invalid root: 3 (expected None or a path)")):
            find(root=3, fetch=False)
        with pytest.raises(ValueError, match=re.escape("Invalid fetch: None (expected True or False)")):
            find(fetch=None)


def test_subset_sizes_and_seeds_are_checked(fashion):
    for bad, arg in ((0, "subset"), (1.5, "subset"), (True, "subset")):
        with pytest.raises(ValueError, match=re.escape(f"Invalid {arg}: {bad!r} (expected None or an int >= 1)")):
            fashion.subset(bad)
    with pytest.raises(ValueError, match=re.escape("Invalid seed: -1 (expected an int >= 0)")):
        fashion.subset(5, seed=-1)
    with pytest.raises(ValueError, match=re.escape("Invalid subset: 0 (expected None or an int >= 1)")):
        ct.stratified_subset(fashion.y_train, 0)
    with pytest.raises(ValueError, match=re.escape("Invalid tasks: 0 (expected an int >= 1)")):
        ct.pixel_permutations(0)
    assert len(fashion.subset(5).y_train) == 5 and fashion.subset(None) is fashion


# --------------------------------------------------------------------------------------------
# split Fashion-MNIST


def test_split_fashion_tasks_have_disjoint_class_pairs(fashion):
    before = rng_states()
    seq = ct.load_sequence("split_fashion_mnist")
    assert_same_rng(before)
    assert (seq.name, seq.num_classes, seq.input_shape, seq.scenario) == ("split_fashion_mnist", 10, (1, 28, 28), "task")
    assert seq.names == ["classes 0-1", "classes 2-3", "classes 4-5", "classes 6-7", "classes 8-9"]
    seen = []
    for t, task in enumerate(seq.tasks):
        assert task.classes == [2 * t, 2 * t + 1] and task.data.num_classes == 10  # global labels, shared head
        for y in (task.data.y_train, task.data.y_test):
            assert sorted(set(y.tolist())) == task.classes
        assert len(task.data.y_train) == 40 and len(task.data.y_test) == 20
        keep = torch.isin(fashion.y_train, torch.tensor(task.classes))
        assert torch.equal(task.data.x_train, fashion.x_train[keep]) and torch.equal(task.data.y_train, fashion.y_train[keep])
        seen += task.classes
    assert sorted(seen) == list(range(10))
    assert [t.classes for t in ct.load_sequence("split_fashion_mnist", tasks=2).tasks] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_split_fashion_subsets_are_stratified_and_deterministic(fashion):
    a = ct.load_split_fashion_mnist(train_subset=10, test_subset=4)
    b = ct.load_split_fashion_mnist(train_subset=10, test_subset=4)
    c = ct.load_split_fashion_mnist(train_subset=10, test_subset=4, subset_seed=1)
    for ta, tb in zip(a.tasks, b.tasks):
        counts = ta.data.y_train.bincount(minlength=10)
        assert counts[ta.classes].tolist() == [5, 5] and counts.sum() == 10
        assert ta.data.y_test.bincount(minlength=10)[ta.classes].tolist() == [2, 2]
        assert torch.equal(ta.data.x_train, tb.data.x_train) and torch.equal(ta.data.x_test, tb.data.x_test)
        rows = ta.data.x_train.flatten(1)  # every kept image is one of the originals of its class
        assert all((fashion.x_train.flatten(1) == r).all(1).any() for r in rows)
    assert any(not torch.equal(ta.data.x_train, tc.data.x_train) for ta, tc in zip(a.tasks, c.tasks))


def test_split_fashion_class_order_seed_permutes(fashion):
    a = ct.load_split_fashion_mnist(class_order_seed=1)
    assert [t.classes for t in a.tasks] == ct.class_split(10, 5, 1) == [t.classes for t in
                                                                        ct.load_split_fashion_mnist(class_order_seed=1).tasks]
    assert [t.classes for t in a.tasks] != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sorted(c for t in a.tasks for c in t.classes) == list(range(10))
    assert ct.class_split(10, 5, 2) != ct.class_split(10, 5, 1)
    for task in a.tasks:
        assert sorted(set(task.data.y_train.tolist())) == task.classes and task.name == ct._classes_name(task.classes)
    assert ct.class_split(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


# --------------------------------------------------------------------------------------------
# permuted Fashion-MNIST


def test_permuted_fashion_applies_saved_permutations(fashion, cache):
    before = rng_states()
    seq = ct.load_sequence("permuted_fashion_mnist", tasks=3)
    assert_same_rng(before)
    assert (seq.num_classes, seq.scenario, seq.names) == (10, "domain", ["permutation 0", "permutation 1", "permutation 2"])
    path = cache / "permutations-fashion-seed0-tasks3.pt"
    perms = torch.load(path, weights_only=True)
    assert perms.shape == (3, 784) and torch.equal(perms[0], torch.arange(784))
    assert not torch.equal(perms[1], perms[2]) and all(torch.equal(p.sort().values, torch.arange(784)) for p in perms)
    assert torch.equal(seq.tasks[0].data.x_train, fashion.x_train) and torch.equal(seq.tasks[0].data.x_test, fashion.x_test)
    for t, task in enumerate(seq.tasks):
        assert task.classes == list(range(10)) and torch.equal(task.data.y_train, fashion.y_train)
        want = fashion.x_train.flatten(1)[:, perms[t]].view(-1, 1, 28, 28)
        assert torch.equal(task.data.x_train, want)
        assert torch.equal(task.data.x_test, fashion.x_test.flatten(1)[:, perms[t]].view(-1, 1, 28, 28))
    # Reused as saved (even a valid edited file), remade when the file is broken.
    edited = perms.clone()
    edited[1] = edited[1].flip(0)
    torch.save(edited, path)
    assert torch.equal(ct.pixel_permutations(3, 0), edited)
    again = ct.load_permuted_fashion_mnist(tasks=3)
    assert torch.equal(again.tasks[1].data.x_train, fashion.x_train.flatten(1)[:, edited[1]].view(-1, 1, 28, 28))
    path.write_bytes(b"not a tensor")
    assert torch.equal(ct.pixel_permutations(3, 0), perms) and torch.equal(torch.load(path, weights_only=True), perms)
    torch.save(perms[:, :100], path)  # wrong shape: remade
    assert torch.equal(ct.pixel_permutations(3, 0), perms)


def test_permutation_seeds_differ_and_prefixes_agree(cache):
    a, b = ct.pixel_permutations(4, 0), ct.pixel_permutations(4, 1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])
    assert torch.equal(ct.pixel_permutations(2, 0), a[:2])
    assert sorted(p.name for p in cache.glob("permutations-*")) == [
        "permutations-fashion-seed0-tasks2.pt", "permutations-fashion-seed0-tasks4.pt",
        "permutations-fashion-seed1-tasks4.pt"]


def test_permuted_fashion_subsets_share_the_images(fashion):
    seq = ct.load_permuted_fashion_mnist(tasks=2, train_subset=30, test_subset=10, permutation_seed=5)
    perms = ct.pixel_permutations(2, 5)
    base = seq.tasks[0].data
    assert base.y_train.bincount().tolist() == [3] * 10 and base.y_test.bincount().tolist() == [1] * 10
    assert torch.equal(seq.tasks[1].data.y_train, base.y_train)
    assert torch.equal(seq.tasks[1].data.x_train, ct.permute_pixels(base.x_train, perms[1]))
    other = ct.load_permuted_fashion_mnist(tasks=2, train_subset=30, test_subset=10, permutation_seed=5)
    assert torch.equal(other.tasks[1].data.x_test, seq.tasks[1].data.x_test)


# --------------------------------------------------------------------------------------------
# VADER domains

WORDS = ["good", "bad", "great", "awful", "movie", "plot", "fine", "dull", "fun", "boring"]


def ground_truth(n, seed):
    """``id<TAB>mean<TAB>sentence`` lines with CRLF ends; the first two rated exactly 0 (dropped)."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        score = 0.0 if i < 2 else (1.5 if i % 2 else -1.25)
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (3 + i % 5,), generator=g).tolist()]
        lines.append(f"{i + 1}\t{score}\t{' '.join(words)}")
    return "\r\n".join(lines)


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_sdist(folder, sizes):
    """A vaderSentiment-3.3.2.tar.gz holding additional_resources/hutto_ICWSM_2014.tar.gz (as on PyPI)."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for i, (domain, n) in enumerate(sizes.items()):
            _add(tar, f"hutto_ICWSM_2014/{data.VADER_DOMAINS[domain]}", ground_truth(n, i).encode())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return path


SIZES = {"tweets": 32, "movies": 42, "amazon": 22, "nyt": 52}  # 30/40/20/50 usable, half positive


@pytest.fixture
def vader(tmp_path, cache, monkeypatch):
    pytest.importorskip("transformers")
    from transformers import BertTokenizerFast

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    monkeypatch.setenv(data.VADER_ENV, str(tmp_path / "vader"))
    write_sdist(tmp_path / "vader", SIZES)
    return {"tokenizer": folder, "fetch": False, "max_length": 10}


def test_vader_sequence_four_domains_in_order(vader, cache):
    before = rng_states()
    seq = ct.load_sequence("vader", **vader)
    assert_same_rng(before)
    assert (seq.name, seq.num_classes, seq.input_shape, seq.scenario) == ("vader", 2, (10,), "domain")
    assert seq.names == ["tweets", "movies", "amazon", "nyt"]
    for task, n in zip(seq.tasks, [30, 40, 20, 50]):
        assert task.classes == [0, 1] and task.data.num_classes == 2 and task.data.name == f"vader_{task.name}"
        assert len(task.data.y_train) == n - round(0.2 * n / 2) * 2 and len(task.data.y_test) == round(0.2 * n / 2) * 2
        assert task.data.x_train["input_ids"].shape == (len(task.data.y_train), 10)
        assert (cache / "vader" / f"split-{task.name}-seed0-test0.2.json").is_file()
        one = data.load_vader(task.name, max_length=10, tokenizer=vader["tokenizer"], fetch=False)
        assert torch.equal(one.x_train["input_ids"], task.data.x_train["input_ids"])
        assert torch.equal(one.y_test, task.data.y_test)
    assert seq.ordered([3, 2, 1, 0]).names == ["nyt", "amazon", "movies", "tweets"]
    reordered = seq.ordered(["movies", "nyt"])
    assert reordered.names == ["movies", "nyt"] and reordered.tasks[1] is seq.tasks[3]
    picked = ct.load_sequence("vader", domains=["nyt", "tweets"], **vader)
    assert picked.names == ["nyt", "tweets"] and torch.equal(picked.tasks[0].data.y_train, seq.tasks[3].data.y_train)


def test_vader_sequence_subsets(vader):
    a = ct.load_vader_sequence(train_subset=8, test_subset=3, **vader)
    b = ct.load_vader_sequence(train_subset=8, test_subset=3, **vader)
    full = ct.load_vader_sequence(**vader)
    for ta, tb, tf in zip(a.tasks, b.tasks, full.tasks):
        assert ta.data.y_train.bincount().tolist() == [4, 4] and len(ta.data.y_test) == 3
        assert ta.data.x_train["attention_mask"].shape == (8, 10)
        assert torch.equal(ta.data.x_train["input_ids"], tb.data.x_train["input_ids"])
        assert torch.equal(ta.data.x_test["input_ids"], tb.data.x_test["input_ids"])
        rows = tf.data.x_train["input_ids"]  # a part of the domain's own training split
        assert all((rows == r).all(1).any() for r in ta.data.x_train["input_ids"])
    other = ct.load_vader_sequence(train_subset=8, subset_seed=1, **vader)
    assert any(not torch.equal(ta.data.x_train["input_ids"], to.data.x_train["input_ids"])
               for ta, to in zip(a.tasks, other.tasks))
