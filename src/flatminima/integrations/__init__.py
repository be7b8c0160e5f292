"""Integrations with the training stacks people already use, each behind an optional extra:
``hf`` (Hugging Face ``Trainer``/``Seq2SeqTrainer``: ``FlatMinimaTrainer``,
``FlatMinimaSeq2SeqTrainer``, ``FlatMinimaArguments``; ``flatminima[hf]``), ``accelerate``
(``AccelerateStep``; ``flatminima[accelerate]``), ``lightning`` (``FlatMinimaModule``;
``flatminima[lightning]``), ``deepspeed`` (``DeepSpeedStep``; ``flatminima[deepspeed]``). Import
the submodule you need; a missing extra raises ``ModuleNotFoundError`` naming the ``pip install``
to run. Nothing here is imported by ``import flatminima``; the core's
``flatminima.core.framework_loops`` (no framework import) lets a flatminima optimizer refuse
framework idioms that would step it wrongly."""
