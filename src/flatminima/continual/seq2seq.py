r"""Text-to-text continual learning: a T5 encoder-decoder (Raffel et al., JMLR 2020, *Exploring the
Limits of Transfer Learning with a Unified Text-to-Text Transformer*) with PEFT LoRA adapters,
trained task after task by the Hugging Face ``Seq2SeqTrainer`` with any flat-minima method.

Tasks (:func:`seq2seq_tasks`): the four VADER domains (tweets, movies, amazon, nyt; the sentences of
:func:`flatminima.data.load_vader`, its saved seeded split) as text-to-text pairs::

    source = "{domain} sentiment: {sentence}",    target = "positive" (mean rating > 0) | "negative"

Tokenizer (:func:`build_tokenizer`, nothing downloaded): a ``tokenizers`` word-level model over the
training pairs (NFKC, lower case, ``Whitespace`` pre-tokenizer; ids ``<pad>`` 0, ``</s>`` 1,
``<unk>`` 2 as T5's, then the label and prompt words, then the other words by decreasing count,
ties alphabetical: a pure function of the texts), ``</s>`` appended to every sequence.

Training (:func:`train_seq2seq_continual`): for task ``t`` of the order,
:meth:`ContinualLoRA.start_task` picks the adapter that trains, and one
:class:`~flatminima.integrations.hf.FlatMinimaSeq2SeqTrainer` minimises per optimizer step

    (1/N) Σ_{n=1..N} L(w; B_n) + R(w),   L(w; B) = −(1/|B|_tok) Σ_{(k,u) ∈ B} log p_w(y_{k,u} | y_{k,<u}, x_k)

(``N`` the gradient-accumulation window, ``R`` the strategy's penalty, once per step, never divided
by ``N``): O-LoRA (Wang et al., EMNLP Findings 2023) ``R = λ₁ Σ_layers Σ_ij |(A_past A_tᵀ)_ij| +
λ₂ Σ_{P∈{A_t,B_t}} ‖P‖_F``; N-LoRA (Yang et al., COLING 2025) ``R = λ Σ_layers ‖s·B_t A_t‖₁``;
seq-LoRA and inc-LoRA ``R = 0`` (:mod:`flatminima.continual.adapters`). Then ``end_task`` freezes
(O-/N-LoRA: folds) the adapter and every task is evaluated by greedy decoding: exact match

    EM_i = (1/n_i) Σ_k 1[strip(decode(ŷ_k)) = y_k],   a[j][i] = EM_i after task j,

with ``continual_metrics(a, b)`` (``b_i``: the initial model's EM, for forward transfer).

Everything the run writes is under ``out_dir``; the caller's RNG states (Python, NumPy, torch) are
restored after it (the Trainer reseeds them: ``set_seed``); the model's train/eval mode is restored.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .._extras import require
from .._files import write_json
from ..core.schedules import derive_seed
from ..core.validation import check, check_choice, check_int, check_optional_int, check_positive
from ..data import VADER_DOMAINS, vader_sentences, vader_split
from .. import methods as _methods
from ..integrations.hf import REGULARIZER_AT, FlatMinimaSeq2SeqTrainer
from .adapters import STRATEGIES, ContinualLoRA
from .metrics import continual_metrics, jsonable, save_accuracy_matrix
from .tasks import stratified_subset

_transformers = require("transformers", "hf", "flatminima.continual.seq2seq")
_tokenizers = require("tokenizers", "hf", "flatminima.continual.seq2seq")

LABEL_WORDS = ("negative", "positive")
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
PROMPT = "{domain} sentiment: {text}"


@dataclasses.dataclass
class Seq2SeqTask:
    """One text-to-text task: ``train``/``test`` lists of ``(source, target)`` pairs."""

    name: str
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]


def seq2seq_tasks(domains: Sequence[str] = tuple(VADER_DOMAINS), train_subset: Optional[int] = None,
                  test_subset: Optional[int] = None, seed: int = 0, split_seed: int = 0,
                  test_fraction: float = 0.2, root=None, fetch: bool = True) -> list[Seq2SeqTask]:
    """The VADER ``domains`` as text-to-text tasks (module docstring), in the order given. The split
    is :func:`flatminima.data.vader_split` (``split_seed``, ``test_fraction``: the one
    :func:`~flatminima.data.load_vader` uses); ``train_subset``/``test_subset`` keep a seeded
    stratified part of each split (:func:`~flatminima.continual.tasks.stratified_subset`, ``seed``)."""
    ok = not isinstance(domains, str) and hasattr(domains, "__iter__")
    names = list(domains) if ok else []
    ok = ok and bool(names) and all(d in VADER_DOMAINS for d in names) and len(set(names)) == len(names)
    check("domains", ok, domains, f"a non-empty list of distinct names from {', '.join(VADER_DOMAINS)}")
    check_optional_int("train_subset", train_subset, 1)
    check_optional_int("test_subset", test_subset, 1)
    check_int("seed", seed, 0)
    tasks = []
    for domain in names:
        ids, sentences, labels, _ = vader_sentences(domain, root, fetch)
        split = vader_split(domain, ids, labels, test_fraction, split_seed)
        by_id = {i: (s, y) for i, s, y in zip(ids, sentences, labels)}
        parts = []
        for key, n in (("train", train_subset), ("test", test_subset)):
            rows = [by_id[i] for i in split[key]]
            keep = stratified_subset(torch.tensor([y for _, y in rows]), n, seed).tolist()
            parts.append([(PROMPT.format(domain=domain, text=rows[k][0]), LABEL_WORDS[rows[k][1]]) for k in keep])
        tasks.append(Seq2SeqTask(domain, *parts))
    return tasks


# --------------------------------------------------------------------------------------------
# tokenizer and model


def _word_pipeline():
    normalizer = _tokenizers.normalizers.Sequence([_tokenizers.normalizers.NFKC(), _tokenizers.normalizers.Lowercase()])
    return normalizer, _tokenizers.pre_tokenizers.Whitespace()


def build_tokenizer(tasks: Sequence[Seq2SeqTask], vocab_size: Optional[int] = None, min_frequency: int = 1):
    """A ``PreTrainedTokenizerFast`` (word level) from the training pairs of ``tasks`` (module
    docstring): at most ``vocab_size`` entries (None: every word seen ``min_frequency`` times or
    more); the special tokens, label words and prompt words are always in it."""
    check("tasks", bool(tasks) and all(isinstance(t, Seq2SeqTask) for t in tasks), type(tasks).__name__,
          "a non-empty list of Seq2SeqTask (seq2seq_tasks)")
    check_optional_int("vocab_size", vocab_size, 3 + len(LABEL_WORDS) + 2 + len(tasks))
    check_int("min_frequency", min_frequency, 1)
    normalizer, pre = _word_pipeline()

    def words(text: str) -> list[str]:
        return [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))]

    counts: collections.Counter = collections.Counter()
    for task in tasks:
        for source, target in task.train:
            counts.update(words(source) + words(target))
    reserved = [PAD, EOS, UNK]
    for word in [*LABEL_WORDS, *words(PROMPT.format(domain="", text="")), *(t.name for t in tasks)]:
        for w in words(word):
            if w not in reserved:
                reserved.append(w)
    rest = sorted((w for w, c in counts.items() if c >= min_frequency and w not in reserved),
                  key=lambda w: (-counts[w], w))
    vocab = reserved + rest
    vocab = vocab[:vocab_size] if vocab_size is not None else vocab
    backend = _tokenizers.Tokenizer(_tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre
    backend.post_processor = _tokenizers.processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab.index(EOS))])
    backend.decoder = _tokenizers.decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces
    return _transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                                 model_input_names=["input_ids", "attention_mask"])


def load_tokenizer(path: Union[str, Path]):
    """A tokenizer from a local folder (``AutoTokenizer``, ``local_files_only=True``: never downloads)."""
    check("path", isinstance(path, (str, Path)) and Path(path).is_dir(), path, "a local tokenizer folder")
    return _transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@contextlib.contextmanager
def _seeded(*keys: int) -> Iterator[None]:
    """A forked CPU RNG seeded from ``keys`` (models draw their init from the global generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(*keys))
        yield


def tiny_t5(vocab_size: int, d_model: int = 32, layers: int = 2, heads: int = 2, d_ff: int = 64, seed: int = 0,
            dropout: float = 0.0, pad_token_id: int = 0, eos_token_id: int = 1, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``T5ForConditionalGeneration`` (``T5Config``: ``layers`` encoder and
    decoder blocks, ``d_kv = d_model / heads``, ReLU feed-forward of width ``d_ff``), its init drawn
    from ``seed`` in a forked RNG; decoding starts from ``pad_token_id`` as T5's."""
    check_int("vocab_size", vocab_size, 3)
    for name, value in (("d_model", d_model), ("layers", layers), ("heads", heads), ("d_ff", d_ff)):
        check_int(name, value, 1)
    check("heads", d_model % heads == 0, heads, f"a divisor of d_model={d_model}")
    check("dropout", isinstance(dropout, float) and 0.0 <= dropout < 1.0, dropout, "a float in [0, 1)")
    check_int("seed", seed, 0)
    config = _transformers.T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, dropout_rate=dropout, feed_forward_proj="relu",
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, decoder_start_token_id=pad_token_id)
    with _seeded(seed):
        model = _transformers.T5ForConditionalGeneration(config)
    return model.to(dtype)


def load_t5(path: Union[str, Path]):
    """An encoder-decoder checkpoint from a local folder (``local_files_only=True``)."""
    check("path", isinstance(path, (str, Path)) and Path(path).is_dir(), path, "a local model folder")
    return _transformers.AutoModelForSeq2SeqLM.from_pretrained(str(path), local_files_only=True)


def with_lora(model, r: int = 4, alpha: float = 8.0, target_modules: Sequence[str] = ("q", "k", "v", "o"),
              dropout: float = 0.0, seed: int = 0):
    """``model`` with one PEFT LoRA adapter (``SEQ_2_SEQ_LM``; ``W = W0 + (α/r)·B A``, ``B = 0`` at
    init) on the named linear layers, its ``A`` drawn from ``seed`` in a forked RNG."""
    peft = require("peft", "hf", "flatminima.continual.seq2seq")
    check_int("r", r, 1)
    check_positive("alpha", alpha)
    check("target_modules", not isinstance(target_modules, str) and bool(list(target_modules)), target_modules,
          "a non-empty list of module names (T5: q, k, v, o, wi, wo)")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                             task_type=peft.TaskType.SEQ_2_SEQ_LM)
    with _seeded(seed, 1):
        return peft.get_peft_model(model, config)


# --------------------------------------------------------------------------------------------
# encoding and evaluation


def encode(tokenizer, pairs: Sequence[tuple[str, str]], max_source_length: int = 64,
           max_target_length: int = 8) -> list[dict[str, list[int]]]:
    """``{"input_ids", "attention_mask", "labels"}`` per pair (unpadded; truncated, ``</s>`` kept)."""
    check_int("max_source_length", max_source_length, 2)
    check_int("max_target_length", max_target_length, 2)
    sources = [s for s, _ in pairs]
    enc = tokenizer(sources, text_target=[t for _, t in pairs], max_length=max_source_length,
                    max_target_length=max_target_length, truncation=True)
    return [{"input_ids": enc["input_ids"][k], "attention_mask": enc["attention_mask"][k], "labels": enc["labels"][k]}
            for k in range(len(sources))]


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """``(1/n) Σ_k 1[strip(prediction_k) = strip(target_k)]`` (case-sensitive)."""
    check("predictions", len(predictions) == len(targets) and len(targets) > 0, len(predictions),
          f"{len(targets)} strings, one per target (at least one)")
    return sum(p.strip() == t.strip() for p, t in zip(predictions, targets)) / len(targets)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


@torch.no_grad()
def evaluate(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 64, max_new_tokens: int = 4,
             max_source_length: int = 64, max_target_length: int = 8) -> dict[str, Any]:
    """Greedy decoding (``num_beams=1``, no sampling, at most ``max_new_tokens``) of every source:
    ``{"accuracy": exact_match, "loss": mean token cross-entropy of the targets (teacher forcing),
    "predictions": [...]}``; the model's modes are restored."""
    check_int("batch_size", batch_size, 1)
    check_int("max_new_tokens", max_new_tokens, 1)
    device = next(model.parameters()).device
    collate = _transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    rows = encode(tokenizer, pairs, max_source_length, max_target_length)
    predictions, loss_sum, tokens = [], 0.0, 0
    with _eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
            count = int((batch["labels"] != -100).sum())
            loss_sum += float(model(**batch).loss) * count
            tokens += count
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            predictions += tokenizer.batch_decode(out, skip_special_tokens=True)
    return {"accuracy": exact_match(predictions, [t for _, t in pairs]), "loss": loss_sum / max(tokens, 1),
            "predictions": predictions}


# --------------------------------------------------------------------------------------------
# the continual run


@contextlib.contextmanager
def _caller_rng() -> Iterator[None]:
    """Put Python's, NumPy's and torch's (CPU, CUDA) global RNG states back afterwards: the Trainer's
    ``set_seed`` reseeds them all."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def _check_order(order: Any, names: list[str]) -> list[int]:
    expected = f"a non-empty list of distinct task names from {names} (or their indices)"
    check("order", not isinstance(order, (str, bytes)) and hasattr(order, "__iter__"), order, expected)
    picked = [names.index(o) if isinstance(o, str) and o in names else o for o in order]
    ok = all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(names) for k in picked)
    check("order", ok and bool(picked) and len(set(picked)) == len(picked), order, expected)
    return picked


def train_seq2seq_continual(model, tokenizer, tasks: Sequence[Seq2SeqTask], order: Optional[Sequence] = None,
                            strategy: str = "seq-lora", method: str = "sgd",
                            hyperparameters: Optional[dict] = None, *, out_dir: Union[str, Path],
                            epochs: float = 1.0, batch_size: int = 8, lr: float = 1e-3, optim: str = "adamw_torch",
                            weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0,
                            gradient_accumulation_steps: int = 1, lr_scheduler_type: str = "constant",
                            seed: int = 0, strategy_options: Optional[dict] = None, regularizer_at: str = "every",
                            max_source_length: int = 64, max_new_tokens: int = 4, eval_batch_size: int = 64,
                            logging_steps: int = 1, use_cpu: bool = False,
                            trainer_class: type = FlatMinimaSeq2SeqTrainer) -> dict[str, Any]:
    """Train ``model`` (a PEFT model with one LoRA adapter: :func:`with_lora`; any model for
    ``finetune``) on ``tasks`` in ``order`` (task names or indices; default: as given) with
    ``strategy`` (:data:`~flatminima.continual.adapters.STRATEGIES`, options ``strategy_options``:
    :class:`ContinualLoRA`'s keywords) and the flat-minima ``method`` (``hyperparameters``: its
    keyword arguments) wrapping the Trainer's ``optim``; evaluate every task after every task
    (module docstring). Each task trains ``epochs`` epochs of ``batch_size`` (× accumulation)
    examples, seeded by ``(seed, t)``. Writes ``record.json``, ``accuracy_matrix.{csv,json[,png]}``
    and the Trainer's folders under ``out_dir``; returns the record: ``accuracy`` (``a[j][i]``),
    ``test_loss``, ``baseline`` (initial EM per task), ``metrics``, ``per_task`` (training losses).
    The model is trained in place (its adapters as the strategy leaves them) and stays on the
    Trainer's device (``use_cpu``, else the accelerator when there is one); its mode is restored."""
    check_choice("strategy", strategy, STRATEGIES)
    names = [t.name for t in tasks] if tasks and all(isinstance(t, Seq2SeqTask) for t in tasks) else []
    check("tasks", bool(names), type(tasks).__name__, "a non-empty list of Seq2SeqTask (seq2seq_tasks)")
    picked = _check_order(range(len(tasks)) if order is None else order, names)
    check("out_dir", isinstance(out_dir, (str, Path)), out_dir, "a folder path")
    check_int("batch_size", batch_size, 1)
    check_positive("epochs", epochs)
    check_positive("lr", lr)
    check("strategy_options", strategy_options is None or isinstance(strategy_options, dict), strategy_options,
          "None or a dict of ContinualLoRA keyword arguments")
    config = model.config
    for key, want in (("pad_token_id", tokenizer.pad_token_id), ("eos_token_id", tokenizer.eos_token_id)):
        check(f"model.config.{key}", getattr(config, key) == want, getattr(config, key),
              f"the tokenizer's {key} ({want})")
    hyper = dict(hyperparameters or {})
    name = _methods.get(method).method_name  # ValueError naming the accepted methods
    unknown = sorted(set(hyper) - set(_methods.hyperparameters(name)))
    check("hyperparameters", not unknown, unknown, f"keys among {', '.join(_methods.hyperparameters(name))}")
    check_choice("regularizer_at", regularizer_at, REGULARIZER_AT)
    ordered = [tasks[k] for k in picked]
    out = Path(out_dir)

    def arguments(j: int, task: Seq2SeqTask):
        return _transformers.Seq2SeqTrainingArguments(
            output_dir=str(out / "trainer" / f"task{j}-{task.name}"), num_train_epochs=epochs,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            learning_rate=lr, weight_decay=weight_decay, optim=optim, lr_scheduler_type=lr_scheduler_type,
            warmup_steps=0, max_grad_norm=max_grad_norm or 0.0, seed=derive_seed(seed, j) % 2**31,
            report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=logging_steps,
            disable_tqdm=True, remove_unused_columns=False, label_names=["labels"], use_cpu=use_cpu,
            dataloader_pin_memory=torch.cuda.is_available() and not use_cpu, log_level="error")

    all_args = [arguments(j, task) for j, task in enumerate(ordered)]  # the Trainer's own checks, before any change
    continual = ContinualLoRA(model, strategy, seed=seed, **(strategy_options or {}))
    collator = _transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    was_training = model.training
    record: dict[str, Any] = {"method": method, "registry_name": name, "hyperparameters": hyper,
                              "strategy": strategy, "strategy_options": dict(strategy_options or {}), "seed": seed,
                              "order": [t.name for t in ordered], "per_task": []}
    with _caller_rng():
        def evaluate_all() -> list[dict[str, Any]]:
            return [evaluate(model, tokenizer, t.test, batch_size=eval_batch_size, max_new_tokens=max_new_tokens,
                             max_source_length=max_source_length) for t in ordered]

        baseline = evaluate_all()
        accuracy, losses = [], []
        for j, task in enumerate(ordered):
            continual.start_task(j)
            args = all_args[j]
            regularizer = (lambda _model: continual.penalty()) if continual.has_penalty else None
            trainer = trainer_class(model=model, args=args, train_dataset=encode(tokenizer, task.train,
                                    max_source_length), data_collator=collator, processing_class=tokenizer,
                                    flat_method=method, flat_hyperparameters=hyper, regularizer=regularizer,
                                    regularizer_at=regularizer_at)
            trainer.remove_callback(_transformers.PrinterCallback)
            started = time.perf_counter()
            result = trainer.train()
            elapsed = time.perf_counter() - started
            continual.end_task()
            record["per_task"].append({
                "task": task.name, "train_loss": float(result.training_loss), "steps": int(result.global_step),
                "train_time_s": elapsed, "losses": [[int(e["step"]), float(e["loss"])]
                                                    for e in trainer.state.log_history if "loss" in e]})
            after = evaluate_all()
            accuracy.append([e["accuracy"] for e in after])
            losses.append([e["loss"] for e in after])
    model.train(was_training)
    b = [e["accuracy"] for e in baseline]
    record.update(accuracy=accuracy, test_loss=losses, baseline=b, baseline_loss=[e["loss"] for e in baseline],
                  metrics=jsonable(continual_metrics(accuracy, b)), predictions=[e["predictions"] for e in after])
    save_accuracy_matrix(accuracy, out, task_names=record["order"], extra={"baseline": b})
    write_json(out / "record.json", jsonable(record), indent=2)
    return record


__all__ = ["LABEL_WORDS", "PROMPT", "Seq2SeqTask", "build_tokenizer", "encode", "evaluate", "exact_match", "load_t5",
           "load_tokenizer", "seq2seq_tasks", "tiny_t5", "train_seq2seq_continual", "with_lora"]
