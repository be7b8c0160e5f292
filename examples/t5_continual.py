"""Text-to-text continual learning with a T5 + LoRA and flat-minima methods under the HF Trainer.

    python examples/t5_continual.py --config configs/t5_continual.yaml --out results/t5_continual
    python examples/t5_continual.py --methods sam --strategies o-lora --orders 1 --train-subset 16   # quick

Every (method, strategy, order) of the config trains a fresh model (a seeded tiny random T5, or a
local checkpoint) on the VADER domains as text-to-text tasks ("<domain> sentiment: <sentence>" ->
"positive"/"negative"), one task after the other (flatminima.continual.seq2seq), and prints the
exact-match accuracy matrix a[j][i] (on task i after training task j) and the continual metrics.
Nothing is downloaded; everything is written under --out: <out>/<method>/<strategy>/<order>/ holds
record.json and accuracy_matrix.{csv,json,png}, <out>/summary.json the metrics of every unit.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever a checkpoint names

import torch  # noqa: E402
import yaml  # noqa: E402

from flatminima.continual import seq2seq  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "t5_continual.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="a YAML config (configs/t5_continual.yaml)")
    p.add_argument("--out", default="results/t5_continual", help="output folder (everything is written there)")
    p.add_argument("--methods", nargs="+", help="keep only these method labels of the config")
    p.add_argument("--strategies", nargs="+", help="keep only these strategies")
    p.add_argument("--orders", type=int, help="keep only the first N orders")
    p.add_argument("--train-subset", type=int, help="training examples per task")
    p.add_argument("--test-subset", type=int, help="test examples per task")
    p.add_argument("--epochs", type=float, help="epochs per task")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a tiny model's ops are too small to split, and idle "
                        "threads spinning on a shared machine slow every op down)")
    return p


def load_config(args: argparse.Namespace) -> dict:
    """The YAML config with the command line's overrides applied."""
    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    if args.methods:
        unknown = sorted(set(args.methods) - set(config["methods"]))
        if unknown:
            raise SystemExit(f"--methods: {unknown} not in the config's methods {sorted(config['methods'])}")
        config["methods"] = {k: v for k, v in config["methods"].items() if k in args.methods}
    if args.strategies:
        config["strategies"] = list(args.strategies)
    if args.orders is not None:
        config["orders"] = config["orders"][:args.orders]
    for key, section, field in (("train_subset", "data", "train_subset"), ("test_subset", "data", "test_subset"),
                                ("epochs", "training", "epochs")):
        if getattr(args, key) is not None:
            config[section][field] = getattr(args, key)
    return config


def _model(config: dict, tokenizer):
    m = config["model"]
    if m.get("path"):
        base = seq2seq.load_t5(m["path"])
    else:
        base = seq2seq.tiny_t5(len(tokenizer), d_model=m["d_model"], layers=m["layers"], heads=m["heads"],
                               d_ff=m["d_ff"], seed=m["seed"], pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    lora = config["lora"]
    return seq2seq.with_lora(base, r=lora["r"], alpha=lora["alpha"], target_modules=lora["target_modules"],
                             seed=m.get("seed", 0))


def _matrix(record: dict) -> str:
    names = record["order"]
    width = max(len(n) for n in names) + 2
    lines = ["after \\ on".ljust(width) + "".join(n.rjust(width) for n in names)]
    for name, row in zip(names, record["accuracy"]):
        lines.append(name.ljust(width) + "".join(f"{v:.3f}".rjust(width) for v in row))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    config = load_config(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(config, Path(args.out))
    finally:
        torch.set_num_threads(threads)  # main() may be called from a session that set its own


def _run(config: dict, out: Path) -> dict:
    data = config["data"]
    tasks = seq2seq.seq2seq_tasks(config["domains"], train_subset=data["train_subset"],
                                  test_subset=data["test_subset"], seed=data["seed"], split_seed=data["split_seed"])
    tok = config["tokenizer"]
    tokenizer = (seq2seq.load_tokenizer(tok["path"]) if tok.get("path")
                 else seq2seq.build_tokenizer(tasks, vocab_size=tok.get("vocab_size")))
    training = dict(config["training"])
    summary = {}
    for label, spec in config["methods"].items():
        spec = dict(spec or {})
        method = spec.pop("method", label)
        for strategy in config["strategies"]:
            for order in config["orders"]:
                name = "-".join(order)
                record = seq2seq.train_seq2seq_continual(
                    _model(config, tokenizer), tokenizer, tasks, order, strategy, method, spec,
                    out_dir=out / label / strategy / name,
                    strategy_options=config.get("strategy_options", {}).get(strategy), **training)
                metrics = record["metrics"]
                print(f"\n== {label} / {strategy} / {' -> '.join(order)}\n{_matrix(record)}")
                print("  ".join(f"{k} {metrics[k]:.3f}" if metrics[k] is not None else f"{k} n/a"
                                for k in ("average_accuracy", "learning_accuracy", "backward_transfer",
                                          "forgetting", "forward_transfer")))
                summary[f"{label}/{strategy}/{name}"] = {"metrics": metrics, "accuracy": record["accuracy"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
