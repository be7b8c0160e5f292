"""Continual learning with LoRA adapters under flat-minima training.

* :mod:`.adapters`: which adapter trains per task (``seq-lora``, ``inc-lora``, ``o-lora``,
  ``n-lora``, or ``finetune``), the O-LoRA/N-LoRA penalties and the fold into the frozen past;
* :mod:`.tasks`: task sequences on offline data (VADER's four domains, Split and Permuted
  Fashion-MNIST) with seeded, saved splits;
* :mod:`.metrics`: average accuracy, learning accuracy, backward/forward transfer and forgetting
  from the accuracy matrix, saved as CSV/JSON and drawn as a heatmap;
One continual run (a method × strategy × task order × seed) for the experiment runner
(``flatminima run`` with a ``continual`` section) is :mod:`flatminima.experiment.continual`.
"""

from .adapters import STRATEGIES, ContinualLoRA
from .metrics import (average_accuracy, backward_transfer, continual_metrics, forgetting, forgetting_per_task,
                      forward_transfer, learning_accuracy, plot_accuracy_matrix, save_accuracy_matrix)
from .tasks import ContinualTask, TaskSequence, available_sequences, load_sequence

__all__ = ["STRATEGIES", "ContinualLoRA", "ContinualTask", "TaskSequence", "available_sequences", "average_accuracy",
           "backward_transfer", "continual_metrics", "forgetting", "forgetting_per_task", "forward_transfer",
           "learning_accuracy", "load_sequence", "plot_accuracy_matrix", "save_accuracy_matrix"]
