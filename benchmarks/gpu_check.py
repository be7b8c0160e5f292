"""The GPU checks as one prepared run, with a time budget per check, and one summary of them all.

    python benchmarks/gpu_check.py --out gpu_results            # on a CUDA machine (gpu_check.sh sets it up first)
    python benchmarks/gpu_check.py --out /tmp/dry --dry-run     # the same checks on the CPU at toy sizes (CI)
    python benchmarks/gpu_check.py --out gpu_results --only flat_lora_step,hessian   # a rerun of some

Each check is a subprocess (the CUDA tests, the fp16 integration tests under real CUDA GradScalers,
the step-overhead table for ResNet-18 and for ViT-S/16 in bf16, the Flat-LoRA step on the 0.4B
Llama-style model against plain LoRA, the Hessian benchmark), run with its own timeout; every check
runs even when an earlier one failed or ran out of time. Into ``--out`` go, per check, its stdout
(the benchmark's tables, pytest's report), its stderr, and its JSON (benchmarks) or JUnit XML
(tests); then ``summary.json`` (every check's status, seconds, budget, command, headline numbers
and the claims it checks) and ``summary.md`` (one table, one row per check, then the benchmarks'
own tables). ``--dry-run`` runs the same checks on the CPU: the tests are collected and skip (the
summary says how many), the benchmarks run at toy sizes, and claims are not judged. The exit status
is 0 when no check failed or timed out. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("passed", "skipped", "failed", "timeout")  # a check is fine when "passed" or "skipped"
# The fp16 tests that need CUDA's own GradScaler: the frameworks' fp16 setups built on the GPU.
FP16_TESTS = ["tests/test_cuda_integrations.py"]
SAM_OVERHEAD_PCT = 5.0  # benchmarks/README.md: SAM's step ≤ its floor + 5% of a base step
FLAT_LORA_MEMORY = 1.01  # Flat-LoRA's peak memory within 1% of the plain LoRA step's
FLAT_LORA_TIME = 1.05  # DESIGN.md §9: the Flat-LoRA step ≤ 1.05 × the plain LoRA step


@dataclass
class Check:
    """One check: ``command(python, out)`` → argv, run from the repository root within ``budget_s``
    seconds; ``kind`` says how its result is read (``pytest``: the JUnit XML at ``artifact``;
    ``bench``: the JSON at ``artifact``, through ``headline``)."""

    name: str
    title: str
    kind: str  # "pytest" | "bench" | "command"
    command: Callable[[str, Path], list[str]]
    budget_s: float
    artifact: Optional[str] = None  # file name under --out
    headline: Optional[Callable[[dict, bool], tuple[dict, str, list]]] = None  # (json, dry) -> (numbers, text, claims)


@dataclass
class Result:
    name: str
    title: str
    status: str
    seconds: float
    budget_s: float
    returncode: Optional[int]
    command: str
    stdout: str
    stderr: str
    artifacts: list = field(default_factory=list)
    headline: dict = field(default_factory=dict)
    headline_text: str = ""
    claims: list = field(default_factory=list)
    reason: str = ""


# --------------------------------------------------------------------------------------------
# Reading the results


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / errors / skipped / total from a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) for s in suites)
    errors = sum(int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped,
            "total": total}


def _finite(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _claim(text: str, value: Optional[float], ok: Optional[bool], dry: bool) -> dict:
    """A claim a check measures; not judged on a dry run (toy sizes on a CPU say nothing about it)."""
    return {"claim": text, "value": value, "met": None if dry or value is None else bool(ok)}


def step_overhead_headline(data: dict, dry: bool) -> tuple[dict, str, list]:
    (model, m), = data["models"].items()
    rows = {r["method"]: r for r in m["rows"]}
    per = {name: {"x_base": _finite(r["ratio_base"]), "x_floor": _finite(r["ratio_floor"]),
                  "over_floor_pct_of_base": _finite(r["over_floor_pct_of_base"]),
                  "fb_per_step": _finite(r["fb_per_step"]), "ms": _finite(r["ms"]),
                  "peak_mib": _finite(r.get("peak_mib")), "mem_delta_weights": _finite(r.get("mem_delta_weights"))}
           for name, r in rows.items()}
    methods = [n for n in per if n != "base" and per[n]["over_floor_pct_of_base"] is not None]
    worst = max(methods, key=lambda n: per[n]["over_floor_pct_of_base"]) if methods else None
    numbers = {"model": model, "device": data["device"], "amp": m["amp"], "batch": m["batch"], "methods": per,
               "worst_over_floor": worst}

    def part(name: str) -> str:
        r = per[name]
        return f"{name} {r['x_base']:.2f} ({r['over_floor_pct_of_base']:+.1f})"

    text = (f"{model} b{m['batch']} {m['amp']}, × base (over floor, % of base): "
            + ", ".join(part(n) for n in per if per[n]["x_base"] is not None))
    sam = per.get("sam", {}).get("over_floor_pct_of_base")
    claims = [_claim(f"sam: step ≤ floor + {SAM_OVERHEAD_PCT:g}% of a base step", sam,
                     sam is not None and sam <= SAM_OVERHEAD_PCT, dry)]
    return numbers, text, claims


def flat_lora_headline(data: dict, dry: bool) -> tuple[dict, str, list]:
    rows = {r["candidate"]: r for r in data["rows"]}
    per = {name: {"ms": _finite(r["ms"]), "x_lora": _finite(r["ratio"]), "peak_mib": _finite(r["peak_mib"]),
                  "mem_x_lora": _finite(r["mem_ratio"]), "us_per_layer": _finite(r["us_per_layer"])}
           for name, r in rows.items()}
    flat = per["flatlora"]
    numbers = {"setting": data["header"], "candidates": per, "flatlora_time_ratio": flat["x_lora"],
               "flatlora_memory_ratio": flat["mem_x_lora"]}
    mem = "n/a (no CUDA memory on a CPU)" if flat["mem_x_lora"] is None else f"×{flat['mem_x_lora']:.4f} LoRA"
    text = (f"flatlora ×{flat['x_lora']:.3f} LoRA step, peak memory {mem}; "
            + ", ".join(f"{n} ×{per[n]['x_lora']:.3f}" for n in per if n not in ("lora", "flatlora")))
    claims = [_claim(f"Flat-LoRA peak memory ≤ {FLAT_LORA_MEMORY:g} × plain LoRA", flat["mem_x_lora"],
                     flat["mem_x_lora"] is not None and flat["mem_x_lora"] <= FLAT_LORA_MEMORY, dry),
              _claim(f"Flat-LoRA step ≤ {FLAT_LORA_TIME:g} × plain LoRA (design target)", flat["x_lora"],
                     flat["x_lora"] is not None and flat["x_lora"] <= FLAT_LORA_TIME, dry)]
    return numbers, text, claims


def hessian_headline(data: dict, dry: bool) -> tuple[dict, str, list]:
    sp = data["speedups"]
    rows = data["rows"]
    numbers = {"model": data["model"], "batch": data["batch"], "device": data["device_name"],
               "reference": data["reference"], "speedups": {k: _finite(v) for k, v in sp.items()},
               "hvps": {k: r["hvps"] for k, r in rows.items()},
               "max_rel_error": {k: _finite(r["max_rel_error"]) for k, r in rows.items()}}
    text = (f"{data['model']} b{data['batch']}: power iteration time / Lanczos time {sp['time_rules']:.2f}× "
            f"(own stopping rules; {rows['pyhessian-power']['hvps']:g} vs {rows['lanczos']['hvps']:g} products), "
            f"{sp['time_equal_accuracy']:.2f}× at equal accuracy")
    err = _finite(rows["lanczos"]["max_rel_error"])
    claims = [_claim(f"Lanczos within tol = {data['tol']:g} of the reference", err,
                     err is not None and err <= data["tol"], dry),
              _claim("Lanczos faster than power iteration at equal accuracy", _finite(sp["time_equal_accuracy"]),
                     sp["time_equal_accuracy"] > 1.0, dry)]
    return numbers, text, claims


# --------------------------------------------------------------------------------------------
# The checks


def checks(dry: bool) -> list[Check]:
    """The prepared run. GPU budgets (seconds, one H100/H200) sum to 515 (8.6 minutes); on a dry run
    every check gets 90 seconds (it takes a few)."""
    def pytest(paths: list[str], xml: str):
        return lambda py, out: [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *paths,
                                f"--junitxml={out / xml}"]

    def bench(script: str, gpu: list[str], toy: list[str], artifact: str):
        return lambda py, out: [py, f"benchmarks/{script}", *(toy if dry else gpu), "--json", str(out / artifact)]

    def budget(gpu: float) -> float:
        return 90.0 if dry else gpu

    def title(gpu: str, toy: str) -> str:
        return toy if dry else gpu

    so_toy = ["--device", "cpu", "--toy", "--amp", "bf16", "--steps", "2", "--block", "1", "--warmup", "1",
              "--mem-steps", "1", "--quiet"]
    skips = " (collected; they skip without CUDA)"
    return [
        Check("cuda_tests", title("tests/test_cuda.py: Triton kernels, CPU/CUDA parity, fp16 GradScaler skip",
                                  "tests/test_cuda.py" + skips), "pytest",
              pytest(["tests/test_cuda.py"], "cuda_tests.xml"), budget(60), "cuda_tests.xml"),
        Check("fp16_integrations", title("fp16 under real CUDA GradScalers: HF Trainer, Lightning 16-mixed, Accelerate",
                                         " ".join(FP16_TESTS) + skips), "pytest",
              pytest(FP16_TESTS, "fp16_integrations.xml"), budget(75), "fp16_integrations.xml"),
        Check("step_overhead_resnet18", title("step overhead, ResNet-18 (CIFAR) b256, bf16, channels_last",
                                              "step overhead, ResNet-18 at toy size (width 4, 16x16, b4), bf16, CPU"),
              "bench", bench("step_overhead.py", ["--device", "cuda", "--models", "resnet18", "--steps", "50"],
                             so_toy + ["--models", "resnet18", "--channels-last", "on"], "step_overhead_resnet18.json"),
              budget(100), "step_overhead_resnet18.json", step_overhead_headline),
        Check("step_overhead_vit_s16", title("step overhead, ViT-S/16 224 b64, bf16",
                                             "step overhead, ViT/16 at toy size (dim 32, depth 2, 32x32, b4), CPU"),
              "bench", bench("step_overhead.py", ["--device", "cuda", "--models", "vit_s16", "--steps", "30"],
                             so_toy + ["--models", "vit_s16"], "step_overhead_vit_s16.json"),
              budget(130), "step_overhead_vit_s16.json", step_overhead_headline),
        Check("flat_lora_step", title("Flat-LoRA vs plain LoRA, 0.4B Llama-style, bf16, 8 × 512",
                                      "Flat-LoRA vs plain LoRA, tiny Llama (2 layers, hidden 32), 2 × 32, fp32, CPU"),
              "bench", bench("flat_lora_step.py", ["--device", "cuda", "--rounds", "6"],
                             ["--device", "cpu", "--quick", "--rounds", "1", "--block", "1", "--layers", "2",
                              "--hidden", "32"], "flat_lora_step.json"),
              budget(100), "flat_lora_step.json", flat_lora_headline),
        Check("hessian", title("top Hessian eigenvalue: Lanczos vs power iteration, ResNet-18 (trained 100 steps) b128",
                               "top Hessian eigenvalue: Lanczos vs power iteration, tiny SmallCNN b32, CPU"),
              "bench", bench("hessian_top_eigenvalue.py", ["--device", "cuda"],
                             ["--device", "cpu", "--quick", "--repeats", "1", "--quiet"], "hessian.json"),
              budget(50), "hessian.json", hessian_headline),
    ]


# --------------------------------------------------------------------------------------------
# Running


def _tail(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def run_check(check: Check, out: Path, python: str, dry: bool, timeout: Optional[float] = None) -> Result:
    """Run one check in its own process group (a timeout ends the group: pytest's or a benchmark's
    children too) and read its result; never raises for the check's own failure."""
    argv = check.command(python, out)
    limit = check.budget_s if timeout is None else timeout
    stdout_path, stderr_path = out / f"{check.name}.stdout.txt", out / f"{check.name}.stderr.txt"
    artifact = out / check.artifact if check.artifact else None
    if artifact is not None and artifact.exists():
        artifact.unlink()  # a result left by an earlier run must not pass for this one's
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    timed_out = False
    with open(stdout_path, "w") as so, open(stderr_path, "w") as se:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=so, stderr=se, env=env, start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    seconds = time.perf_counter() - t0
    res = Result(check.name, check.title, "failed", seconds, limit, rc, " ".join(argv),
                 str(stdout_path.relative_to(out)), str(stderr_path.relative_to(out)))
    if artifact is not None and artifact.exists():
        res.artifacts.append(str(artifact.relative_to(out)))
    stdout = stdout_path.read_text(errors="replace")
    if timed_out:
        res.status, res.reason = "timeout", f"ran past its budget of {limit:.0f} s and was stopped"
        return res
    try:
        if check.kind == "pytest":
            _read_pytest(res, artifact, stdout)
        elif check.kind == "bench":
            _read_bench(res, check, artifact, dry)
        else:
            res.status = "passed" if rc == 0 else "failed"
            res.headline_text = _tail(stdout, 1)
    except Exception as exc:  # a result that cannot be read is a failed check, with the reason
        res.status, res.reason = "failed", f"could not read the result: {type(exc).__name__}: {exc}"
    if res.status == "failed" and not res.reason:
        res.reason = f"exit status {rc}: " + _tail(stderr_path.read_text(errors="replace") or stdout, 3)
    return res


def _read_pytest(res: Result, xml: Optional[Path], stdout: str) -> None:
    if xml is None or not xml.exists():
        res.reason = f"no JUnit report (exit status {res.returncode}): {_tail(stdout, 3)}"
        return
    counts = junit_counts(xml)
    res.headline = counts
    res.headline_text = (f"{counts['passed']} passed, {counts['failed'] + counts['errors']} failed, "
                         f"{counts['skipped']} skipped")
    if res.returncode == 0 and counts["passed"] > 0:
        res.status = "passed"
    elif res.returncode == 0 and counts["total"] > 0 and counts["skipped"] == counts["total"]:
        res.status = "skipped"
        reasons = sorted({line.split(": ", 2)[-1] for line in stdout.splitlines() if line.startswith("SKIPPED")})
        res.reason = "; ".join(reasons)
    else:
        res.status = "failed"
        res.reason = f"exit status {res.returncode}: {_tail(stdout, 5)}"


def _read_bench(res: Result, check: Check, path: Optional[Path], dry: bool) -> None:
    if res.returncode != 0:
        return
    if path is None or not path.exists():
        res.reason = "exit status 0 but no JSON written"
        return
    data = json.loads(path.read_text())
    device = str(data.get("device") or data.get("device_name") or data.get("header", ""))
    if not dry and (device.lower().startswith("cpu") or ", cpu, " in device):  # flat_lora_step's header names it
        res.reason = f"ran on {device!r}, not on CUDA"
        return
    if check.headline is not None:
        res.headline, res.headline_text, res.claims = check.headline(data, dry)
    res.status = "passed"


def run_all(selected: list[Check], out: Path, python: str, dry: bool, deadline_s: Optional[float] = None,
            setup_seconds: Optional[float] = None, log: Callable[[str], None] = print) -> dict:
    """Run every check (none is skipped because an earlier one failed), then write
    ``summary.json`` and ``summary.md`` into ``out``; returns the summary. ``deadline_s`` caps the
    whole: a check gets at most what is left of it (a check with under 5 s left is not started and
    counts as timed out)."""
    out.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    results: list[Result] = []
    for check in selected:
        left = None if deadline_s is None else deadline_s - (time.perf_counter() - t0)
        if left is not None and left < 5:
            results.append(Result(check.name, check.title, "timeout", 0.0, check.budget_s, None,
                                  " ".join(check.command(python, out)), "", "",
                                  reason=f"not started: the run's {deadline_s:.0f} s were spent"))
            log(f"[{check.name}] not started (out of time)")
            continue
        log(f"[{check.name}] budget {check.budget_s:.0f} s: {' '.join(check.command(python, out))}")
        res = run_check(check, out, python, dry, timeout=None if left is None else min(check.budget_s, left))
        results.append(res)
        log(f"[{check.name}] {res.status} in {res.seconds:.1f} s: {res.headline_text or res.reason}")
    summary = _summary(results, out, python, dry, started, time.perf_counter() - t0, setup_seconds)
    summary["deadline_seconds"] = deadline_s
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out / "summary.md").write_text(markdown(summary, out))
    return summary


def _device_info(python: str) -> dict:
    code = ("import json, platform, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__,"
            " 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if c else "
            "'CPU (' + (platform.processor() or platform.machine()) + ')'}))")
    try:
        proc = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:  # the summary still gets written
        return {"error": f"{type(exc).__name__}: {exc}"}


def _git_commit() -> Optional[str]:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() or None
    except Exception:
        return None


def _summary(results: list[Result], out: Path, python: str, dry: bool, started, wall: float,
             setup_seconds: Optional[float]) -> dict:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return {
        "mode": "dry-run" if dry else "gpu",
        "started_utc": started.isoformat(timespec="seconds"),
        "host": platform.node(), "python": python, **_device_info(python), "commit": _git_commit(),
        "setup_seconds": setup_seconds, "wall_seconds": wall,
        "budget_seconds": sum(r.budget_s for r in results),
        "counts": counts, "ok": counts["failed"] == 0 and counts["timeout"] == 0,
        "checks": [r.__dict__ for r in results],
    }


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _claims_cell(claims: list) -> str:
    judged = [c for c in claims if c["met"] is not None]
    if not claims:
        return ""
    if not judged:
        return "(claims not judged on a dry run)"
    missed = [c["claim"] for c in judged if not c["met"]]
    return f"(claims met: {len(judged) - len(missed)}/{len(judged)}" + (f"; not met: {'; '.join(missed)}" if missed
                                                                          else "") + ")"


def markdown(summary: dict, out: Path) -> str:
    mode = "dry run on the CPU, toy sizes: no result is a GPU number" if summary["mode"] == "dry-run" else "GPU run"
    setup = summary.get("setup_seconds")
    lines = [f"# gpu_check: {mode}", "",
             f"{summary.get('device', summary.get('error', '?'))}, torch {summary.get('torch', '?')}"
             f"{', CUDA ' + summary['cuda'] if summary.get('cuda') else ''}; {summary['started_utc']}; "
             f"commit {summary.get('commit') or '?'}; checks {summary['wall_seconds']:.0f} s (budgets "
             f"{summary['budget_seconds']:.0f} s" + (f", cap {summary['deadline_seconds']:.0f} s"
                                                     if summary.get("deadline_seconds") else "") + ")"
             + (f"; setup {setup:.0f} s" if setup is not None else ""), "",
             "| check | status | seconds | headline |", "|---|---|---:|---|"]
    for c in summary["checks"]:
        head = c["headline_text"] if c["status"] in ("passed", "skipped") and c["headline_text"] else c["reason"]
        if c["status"] == "skipped" and c["reason"]:
            head = f"{c['headline_text']} ({c['reason']})"
        cell = " ".join(x for x in (_cell(head), _cell(_claims_cell(c["claims"]))) if x)
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} | {cell} |")
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    lines += ["", f"Counts: {counts}. Per check: `<check>.stdout.txt`, `<check>.stderr.txt` and its JSON or "
                  "JUnit XML beside this file.", ""]
    for c in summary["checks"]:
        if c["status"] == "passed" and c["name"].startswith(("step_overhead", "flat_lora", "hessian")):
            text = (out / c["stdout"]).read_text(errors="replace").strip() if c["stdout"] else ""
            table = "\n".join(line for line in text.splitlines() if not line.startswith(("USDT:", "WARNING")))
            lines += [f"## {c['name']}: {c['title']}", "", table, ""]
        elif c["status"] in ("failed", "timeout"):
            lines += [f"## {c['name']}: {c['status']}", "", "```", c["reason"], "```", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_results"), help="results folder (default $OUT or "
                                                                                "gpu_results)")
    ap.add_argument("--dry-run", action="store_true", help="the same checks on the CPU at toy sizes")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the checks (default: this one)")
    ap.add_argument("--only", default=None, help="comma list of check names (default: all)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run (default: 540 on a GPU, none on a dry run)")
    ap.add_argument("--setup-seconds", type=float, default=None, help="(from gpu_check.sh) the setup's duration")
    args = ap.parse_args(argv)
    if os.sep in args.python and Path(args.python).exists():
        args.python = str(Path(args.python).absolute())  # the checks run from the repository root
    selected = checks(args.dry_run)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {c.name for c in selected})
        if unknown:
            ap.error(f"unknown check(s) {unknown}; choose from {[c.name for c in selected]}")
        selected = [c for c in selected if c.name in names]
    if not args.dry_run:
        probe = subprocess.run([args.python, "-c", "import torch; assert torch.cuda.is_available()"], cwd=ROOT,
                               capture_output=True, text=True)
        if probe.returncode != 0:
            print("gpu_check: no CUDA device for " + args.python + " (use --dry-run on a CPU)", file=sys.stderr)
            return 2
    deadline = args.deadline if args.deadline is not None else (None if args.dry_run else 540.0)
    summary = run_all(selected, Path(args.out).resolve(), args.python, args.dry_run, deadline, args.setup_seconds)
    print((Path(args.out) / "summary.md").read_text())
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
