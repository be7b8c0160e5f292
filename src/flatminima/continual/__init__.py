"""Continual learning with LoRA adapters under flat-minima training.

* :mod:`.adapters`: which adapter trains per task (``seq-lora``, optionally merge-then-reset,
  ``inc-lora``, ``o-lora``, ``n-lora``, or ``finetune``), the O-LoRA/N-LoRA penalties and the fold
  into the frozen past (:mod:`.lifecycle`: the adapter operations);
* :mod:`.strategy`: baselines that compose with any lifecycle and method (``seq-lora+ewc``):
  :mod:`.regularizers` (EWC, LwF), :mod:`.memory` (experience replay, A-GEM), :mod:`.projection`
  (GPM, OGD), :mod:`.inflora` (InfLoRA);
* :mod:`.tasks`: task sequences on offline data (VADER's four domains, Split and Permuted
  Fashion-MNIST) with seeded, saved splits; :mod:`.image_tasks`: class-incremental image folders
  streamed from disk (ImageNet-R, CIFAR-100, CUB, Cars, DomainNet, Fashion-MNIST as PNGs);
* :mod:`.metrics`: average (incremental) accuracy, learning accuracy, backward/forward transfer and
  forgetting from the accuracy matrix, saved as CSV/JSON and drawn as a heatmap; :mod:`.nme`:
  nearest-class-mean accuracy; :mod:`.flatness`: per-task flatness matrices and their correlation
  with forgetting; :mod:`.seq2seq`: text-to-text continual learning through the HF Trainer;
One continual run (a method × strategy × task order × seed) for the experiment runner
(``flatminima run`` with a ``continual`` section) is :mod:`flatminima.experiment.continual`.
"""

from .adapters import STRATEGIES, ContinualLoRA
from .metrics import (average_accuracy, backward_transfer, continual_metrics, forgetting, forgetting_per_task,
                      forward_transfer, learning_accuracy, plot_accuracy_matrix, save_accuracy_matrix)
from .tasks import ContinualTask, TaskSequence, available_sequences, load_sequence
from . import image_tasks  # noqa: F401  (registers the image-folder sequences)
from .memory import AGEM, Replay, Reservoir
from .regularizers import EWC, LwF
from .projection import GPM, OGD
from .inflora import InfLoRA
from .flatness import PerTaskFlatness, flatness_forgetting_correlation
from .nme import ClassPrototypes, nme_accuracy
from .strategy import BASELINES, Baseline, TaskContext, register_baseline, split_strategy

__all__ = ["AGEM", "BASELINES", "Baseline", "ClassPrototypes", "EWC", "GPM", "InfLoRA", "OGD", "LwF", "PerTaskFlatness", "Replay", "Reservoir",
           "TaskContext", "flatness_forgetting_correlation", "nme_accuracy", "register_baseline", "split_strategy",
           "STRATEGIES", "ContinualLoRA", "ContinualTask", "TaskSequence", "available_sequences", "average_accuracy",
           "backward_transfer", "continual_metrics", "forgetting", "forgetting_per_task", "forward_transfer",
           "learning_accuracy", "load_sequence", "plot_accuracy_matrix", "save_accuracy_matrix"]
