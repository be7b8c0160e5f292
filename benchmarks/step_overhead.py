"""Step time and peak memory of every method against the base optimizer and the method's floor.

    python benchmarks/step_overhead.py                       # CPU: SmallCNN, every method (~1.5 min)
    python benchmarks/step_overhead.py --device cuda         # ResNet-18/CIFAR b256 + ViT-S/16 b64, bf16
    python benchmarks/step_overhead.py --quick --methods sam,naive-sam --json out.json
    python benchmarks/step_overhead.py --device cpu --toy --models resnet18,vit_s16 --steps 2   # CUDA models, toy sizes

All numbers come from one process. For each model it measures, interleaved round-robin in blocks
of steps (so that clock and thermal drift hit every candidate alike):

* ``fb``: one forward + backward (gradients set to None first, as every method does);
* ``fwd``: one forward under ``torch.no_grad`` (the probes of forward-only methods);
* ``upd``: one base-optimizer update alone (SGD, momentum 0.9);
* ``base``: the plain PyTorch step, ``zero_grad(); closure(); base.step()``;
* every method's full ``opt.step(closure)``, and the naive per-parameter SAM (``naive_sam.py``).

The *floor* of a method is ``n_fb × fb + n_fwd × fwd + upd`` for the passes it really ran (counted
in the closure, step by step: 2 for SAM, 1 + 1/k for LookSAM, the drawn fraction of SAM steps for
AE-SAM and stochastic SAM, ...), measured as one unit: for every per-step pattern of passes seen
while warming up, a floor candidate runs exactly those passes and one base update. Ratios are
paired by round (against the base step and the floors timed in the same round) and reported as
medians. Memory is measured afterwards, one candidate at a time on a freshly built model: CUDA
``max_memory_allocated``; on CPU the running total of the allocator events that ``torch.profiler``
records (model, gradients, optimizer and method state, activations). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as nnf
from torch import nn

import flatminima as fm
from flatminima import models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_sam import NaiveSAM  # noqa: E402

NAIVE = "naive-sam"
REFERENCE = "base"  # the plain torch step every ratio is taken against
MiB = 2.0**20

# Passes per step the method's definition implies (for the README and the JSON; the floor uses the
# counted passes).
NOMINAL = {
    "base": "1", "sam": "2", "asam": "2", "layersam": "2", "ssam": "2", NAIVE: "2",
    "gasam": "K+1", "multistepsam": "K+1", "looksam": "1+1/k", "stochasticsam": "1+p",
    "aesam": "1 to 2", "randomsearchsam": "1 + (c+1) fwd",
    "gsam": "2", "wsam": "2", "friendlysam": "2", "vasso": "2", "fishersam": "2", "gam": "4", "cflat": "4",
}


# --------------------------------------------------------------------------------------------
# Workloads


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample
    num_classes: int
    batch: int
    channels_last: bool = False  # on CUDA only
    note: str = ""


def model_specs() -> dict[str, ModelSpec]:
    return {
        "smallcnn": ModelSpec("smallcnn", lambda: models.SmallCNN(1, 10, width=16, side=28), (1, 28, 28), 10, 64,
                              note="SmallCNN(width=16), 1x28x28"),
        "mlp": ModelSpec("mlp", lambda: models.MLP(784, 10, hidden=64, depth=32), (1, 28, 28), 10, 128,
                         note="MLP 784-64x32-10 (66 small tensors)"),
        "resnet18": ModelSpec("resnet18", lambda: models.resnet18_cifar(10), (3, 32, 32), 10, 256, channels_last=True,
                              note="ResNet-18 (CIFAR geometry), 3x32x32"),
        "vit_s16": ModelSpec("vit_s16", lambda: models.vit_small_patch16(1000, 224), (3, 224, 224), 1000, 64,
                             note="ViT-S/16, 3x224x224"),
    }


QUICK_SPEC = ModelSpec("smallcnn-tiny", lambda: models.SmallCNN(1, 10, width=8, side=16), (1, 16, 16), 10, 16,
                       note="SmallCNN(width=8), 1x16x16 (quick)")


def toy_specs() -> dict[str, ModelSpec]:
    """The same architectures at toy sizes (``--toy``): what ``gpu_check.sh --dry-run`` runs on a CPU, so that
    the code path of the CUDA run (ResNet-18's blocks, the ViT's attention, channels_last, autocast) is
    exercised in seconds."""
    return {
        "smallcnn": QUICK_SPEC,
        "mlp": ModelSpec("mlp-toy", lambda: models.MLP(64, 10, hidden=8, depth=4), (1, 8, 8), 10, 8,
                         note="MLP 64-8x4-10 (toy)"),
        "resnet18": ModelSpec("resnet18-toy", lambda: models.resnet18_cifar(10, width=4), (3, 16, 16), 10, 4,
                              channels_last=True, note="ResNet-18 (CIFAR geometry, width 4), 3x16x16 (toy)"),
        "vit_s16": ModelSpec("vit_s16-toy", lambda: models.ViT(32, 16, 10, dim=32, depth=2, heads=2), (3, 32, 32), 10,
                             4, note="ViT/16 (dim 32, depth 2, 2 heads), 3x32x32 (toy)"),
    }


class OpCounter:
    """Counts the aten ops dispatched outside the forward/backward passes (a proxy, measurable on a
    CPU, for the kernel launches and host work a method adds) and the scalar reads to the host
    (``.item()``/``float()``) of tensors on ``device`` (each is a device sync on CUDA)."""

    def __init__(self, device: torch.device):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if counter.active:
                    counter.ops += 1
                    if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == device.type:
                        counter.reads += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.active, self.ops, self.reads = True, 0, 0


class Workload:
    """A model, a fixed synthetic batch and the closure every candidate steps with."""

    def __init__(self, spec: ModelSpec, device: torch.device, amp: Optional[torch.dtype], channels_last: bool,
                 batch: int, n_batches: int = 4, seed: int = 0):
        self.spec, self.device, self.amp, self.batch = spec, device, amp, batch
        self.channels_last = channels_last
        gen = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(n_batches):
            x = torch.randn((batch, *spec.input_shape), generator=gen).to(device)
            y = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.batches.append((x, y))
        self._i = 0
        self.x, self.y = self.batches[0]
        self.model: nn.Module = self.build_model()
        self.n_fb = self.n_fwd = 0
        self.step_log: Optional[list] = None  # (fb, fwd) passes of each step, while recording
        self.counter: Optional[OpCounter] = None

    def next_batch(self) -> None:
        """Every timed unit starts with this: a few fixed batches in turn, so that the gradient norm
        varies from step to step as in training (AE-SAM's trigger and SSAM's mask depend on it)."""
        self._i = (self._i + 1) % len(self.batches)
        self.x, self.y = self.batches[self._i]

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        model = self.spec.build().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.train()

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def closure(self, backward: bool = True):
        counter = self.counter
        if counter is not None:
            counter.active = False
        try:
            with self.autocast():
                loss = nnf.cross_entropy(self.model(self.x), self.y)
            if backward:
                loss.backward()
                self.n_fb += 1
            else:
                self.n_fwd += 1
            return loss
        finally:
            if counter is not None:
                counter.active = True


# --------------------------------------------------------------------------------------------
# Candidates


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"gasam:steps=3;epsilon=0.02"`` -> ``("gasam", {"steps": 3, "epsilon": 0.02})``."""
    name, _, rest = spec.partition(":")
    hp: dict[str, Any] = {}
    for item in filter(None, rest.split(";")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"bad hyperparameter {item!r} in method spec {spec!r} (expected key=value)")
        try:
            hp[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            hp[k.strip()] = v.strip()
    return name.strip(), hp


def make_base(params, args) -> torch.optim.Optimizer:
    kw: dict[str, Any] = dict(lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    if args.fused:
        kw["fused"] = True
    return torch.optim.SGD(params, **kw)


@dataclass
class Candidate:
    """A timed thing: ``step()`` runs one unit (a pass, an update or a full optimizer step)."""

    label: str
    kind: str  # "ref" (fb/fwd/upd), "floor" (passes + update) or "step" (base, methods)
    make: Callable[[Workload], Callable[[], Any]]  # builds state on the workload's model, returns the step
    method: Optional[str] = None
    hyperparameters: dict = field(default_factory=dict)
    pattern: Optional[tuple[int, int]] = None  # floors: (fb passes, forward-only passes)


def reference_candidates(args) -> list[Candidate]:
    def fb(wl: Workload):
        params = list(wl.model.parameters())

        def run():
            wl.next_batch()
            for p in params:
                p.grad = None
            wl.closure()
        return run

    def fwd(wl: Workload):
        def run():
            wl.next_batch()
            with torch.no_grad():
                wl.closure(backward=False)
        return run

    def upd(wl: Workload):
        opt = make_base(wl.model.parameters(), args)
        params = list(wl.model.parameters())

        def run():
            if any(p.grad is None for p in params):  # gradients are left in place by every candidate
                wl.closure()
            opt.step()
        return run

    return [Candidate("fb", "ref", fb), Candidate("fwd", "ref", fwd), Candidate("upd", "ref", upd)]


def _log_passes(wl: Workload, step: Callable[[], Any]) -> Any:
    fb, fwd = wl.n_fb, wl.n_fwd
    out = step()
    if wl.step_log is not None:
        wl.step_log.append((wl.n_fb - fb, wl.n_fwd - fwd))
    return out


def _stepper(wl: Workload, opt: torch.optim.Optimizer) -> Callable[[], Any]:
    def run():
        wl.next_batch()
        return _log_passes(wl, lambda: opt.step(wl.closure))
    return run


def floor_candidate(pattern: tuple[int, int], args) -> Candidate:
    """The floor of a step that runs ``pattern = (n_fb, n_fwd)`` passes, measured as one unit: the
    forward-only passes, the forward/backward passes (gradients set to None before each, as the
    methods do) and one base update, with nothing in between."""
    n_fb, n_fwd = pattern

    def make(wl: Workload):
        opt = make_base(wl.model.parameters(), args)
        params = list(wl.model.parameters())

        def run():
            wl.next_batch()
            if n_fwd:
                with torch.no_grad():
                    for _ in range(n_fwd):
                        wl.closure(backward=False)
            for _ in range(n_fb):
                for p in params:
                    p.grad = None
                wl.closure()
            opt.step()
        return run

    label = f"{n_fb} fb" + (f" + {n_fwd} fwd" if n_fwd else "") + " + upd"
    return Candidate(label, "floor", make, pattern=pattern)


def step_candidates(methods: list[str], args) -> list[Candidate]:
    def plain(wl: Workload):
        opt = make_base(wl.model.parameters(), args)

        def step():
            opt.zero_grad(set_to_none=True)
            wl.closure()
            opt.step()

        def run():
            wl.next_batch()
            _log_passes(wl, step)
        return run

    out = [Candidate(REFERENCE, "step", plain, method=REFERENCE)]
    if len(set(methods)) != len(methods):
        raise SystemExit(f"--methods lists a method twice: {methods}")
    for spec in methods:
        name, hp = parse_method(spec)
        if name == NAIVE:
            def naive(wl: Workload, hp=hp):
                opt = NaiveSAM(make_base(wl.model.parameters(), args), **hp)
                return _stepper(wl, opt)
            out.append(Candidate(spec, "step", naive, method=NAIVE, hyperparameters=hp))
            continue
        fm.get(name)  # fails early on an unknown name
        canonical = fm.get(name).method_name
        label = "fm.base" if canonical == "base" and spec == name else spec

        def method(wl: Workload, name=name, hp=hp):
            opt = fm.create(name, make_base(wl.model.parameters(), args), **hp)
            return _stepper(wl, opt)
        out.append(Candidate(label, "step", method, method=canonical, hyperparameters=hp))
    return out


# --------------------------------------------------------------------------------------------
# Measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(run: Callable[[], Any], n: int, device: torch.device, clock: str = "wall") -> float:
    """Milliseconds per call over ``n`` back-to-back calls: CUDA events on a GPU; on a CPU wall time,
    or the process's CPU time (``clock="process"``: what one thread spent, not what other programs
    took from it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n
    now = time.process_time if clock == "process" else time.perf_counter
    t0 = now()
    for _ in range(n):
        run()
    return (now() - t0) * 1e3 / n


@dataclass
class Timing:
    times: list = field(default_factory=list)  # ms/step per round
    fb: list = field(default_factory=list)  # fb passes per step per round
    fwd: list = field(default_factory=list)
    patterns: list = field(default_factory=list)  # per round: {(fb, fwd): steps}


def measure_times(wl: Workload, cands: list[Candidate], args, log) -> tuple[dict[str, Timing], list[Candidate]]:
    """Time every candidate, and a floor candidate for every pass pattern the steps showed while
    warming up; returns the timings and the floor candidates."""
    runs = {c.label: c.make(wl) for c in cands}
    seen: set = set()
    for c in cands:  # warm up (state, autotuning, allocator) and learn the pass patterns
        wl.step_log = []
        for _ in range(args.warmup):
            runs[c.label]()
        seen.update(wl.step_log)
    wl.step_log = None
    floors = [floor_candidate(p, args) for p in sorted(seen)]
    for f in floors:
        runs[f.label] = f.make(wl)
        for _ in range(args.warmup):
            runs[f.label]()
    synchronize(wl.device)
    cands = cands + floors
    res = {c.label: Timing() for c in cands}
    rounds = max(1, math.ceil(args.steps / args.block))
    order = [c.label for c in cands]
    for r in range(rounds):
        rot = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first
        for label in rot:
            wl.n_fb = wl.n_fwd = 0
            wl.step_log = []
            t = time_block(runs[label], args.block, wl.device, args.clock)
            res[label].times.append(t)
            res[label].fb.append(wl.n_fb / args.block)
            res[label].fwd.append(wl.n_fwd / args.block)
            res[label].patterns.append(Counter(wl.step_log))
        wl.step_log = None
        log(f"  round {r + 1}/{rounds}")
    del runs
    return res, floors


def memory_profile_cpu(run_window: Callable[[Callable[[], Any]], Any]) -> tuple[int, int]:
    """Peak and start-of-measurement live bytes from the CPU allocator events of the profiler.

    Everything the window holds (model, gradients, states) is allocated inside it, so each free has a
    matching allocation and the running total is the live memory of the candidate.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    mark = "step_overhead::measure"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_window(lambda: record_function(mark))
    events = list(prof.profiler.kineto_results.events())
    marks = [e for e in events if e.name() == mark]
    t0, t1 = marks[0].start_ns(), marks[0].end_ns()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU")
    live, start, peak = 0, None, 0
    for ts, nbytes in mem:
        if ts >= t0 and start is None:
            start = peak = live
        live += nbytes
        if start is not None and ts <= t1:
            peak = max(peak, live)
    if start is None:
        start = peak = live
    return peak, start


def measure_memory(wl: Workload, cand: Candidate, args) -> dict:
    """Peak memory of one candidate alone on a freshly built model, over ``mem_steps`` steps after
    the one that creates its state; and the ops it dispatches outside the passes in as many steps
    (on a CPU in the same window; on CUDA right after it, so that the Python dispatch mode cannot
    touch the memory numbers)."""
    steps = max(1, args.mem_steps)
    cuda = wl.device.type == "cuda"
    counter = OpCounter(wl.device) if args.count_ops else None

    def counted():
        return counter.mode if counter is not None else contextlib.nullcontext()

    def window(marker):
        wl.model = wl.build_model()
        run = cand.make(wl)
        run()  # creates the optimizer's and the method's state; the window then covers steps 1..mem_steps
        wl.model.zero_grad(set_to_none=True)
        synchronize(wl.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(wl.device)
        wl.counter = None if cuda else counter
        try:
            with marker(), (contextlib.nullcontext() if cuda else counted()):
                for _ in range(steps):
                    run()
            synchronize(wl.device)
        finally:
            wl.counter = None
        return run

    wl.model = None
    gc.collect()
    out: dict[str, Any] = {}
    if cuda:
        torch.cuda.empty_cache()
        synchronize(wl.device)
        m0 = torch.cuda.memory_allocated(wl.device)
        run = window(contextlib.nullcontext)
        out["peak_bytes"] = torch.cuda.max_memory_allocated(wl.device) - m0
        if counter is not None:
            wl.counter = counter
            try:
                with counted():
                    for _ in range(steps):
                        run()
                synchronize(wl.device)
            finally:
                wl.counter = None
        del run
    else:
        out["peak_bytes"], _ = memory_profile_cpu(window)
    if counter is not None:
        out["ops_per_step"] = counter.ops / steps
        out["reads_per_step"] = counter.reads / steps
    return out


# --------------------------------------------------------------------------------------------
# Report


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return 100.0 * (q[2] - q[0]) / statistics.median(xs)


def summarize(timings: dict[str, Timing], memory: dict[str, dict], cands: list[Candidate], floors: list[Candidate],
              param_bytes: int) -> dict:
    t_fb, t_fwd, t_upd = (_median(timings[k].times) for k in ("fb", "fwd", "upd"))
    base = timings[REFERENCE].times
    t_base = _median(base)
    floor_label = {f.pattern: f.label for f in floors}
    ref = {"fb_ms": t_fb, "fwd_ms": t_fwd, "upd_ms": t_upd, "base_ms": t_base,
           "base_floor_ms": t_fb + t_upd, "param_bytes": param_bytes,
           "floors_ms": {f.label: _median(timings[f.label].times) for f in floors},
           "times_ms": {k: timings[k].times for k in ("fb", "fwd", "upd", *floor_label.values())}}
    rounds = len(base)

    def floor_time(pattern, r: Optional[int] = None) -> float:
        """Round ``r``'s (or the median) time of a step that runs ``pattern``: the measured floor
        candidate, or for a pattern first seen while timing, the sum of its parts."""
        pick = (lambda xs: xs[r]) if r is not None else _median
        if pattern in floor_label:
            return pick(timings[floor_label[pattern]].times)
        n_fb, n_fwd = pattern
        return n_fb * pick(timings["fb"].times) + n_fwd * pick(timings["fwd"].times) + pick(timings["upd"].times)

    mem_base = memory.get(REFERENCE, {}).get("peak_bytes")
    rows = []
    for c in cands:
        if c.kind != "step":
            continue
        tm = timings[c.label]
        n_fb, n_fwd = statistics.fmean(tm.fb), statistics.fmean(tm.fwd)
        # A round that drew more (fewer) SAM steps than the average is moved by its extra passes, so
        # the median compares like with like for the stochastic triggers.
        adjusted = [t - (a - n_fb) * t_fb - (b - n_fwd) * t_fwd for t, a, b in zip(tm.times, tm.fb, tm.fwd)]
        t = _median(adjusted)
        total = sum(tm.patterns, Counter())
        steps = sum(total.values())
        floor = sum(k * floor_time(p) for p, k in total.items()) / steps
        # Paired per round: the step against the floor of the very passes it ran in that round and
        # against the base step of the same round, so that drift between rounds cancels.
        floor_r = [sum(k * floor_time(p, r) for p, k in tm.patterns[r].items()) / sum(tm.patterns[r].values())
                   for r in range(rounds)]
        component = n_fb * t_fb + n_fwd * t_fwd + t_upd
        row = {
            "method": c.label, "name": c.method, "hyperparameters": c.hyperparameters,
            "nominal_passes": NOMINAL.get(c.method or "", ""),
            "fb_per_step": n_fb, "fwd_per_step": n_fwd, "ms": t, "spread_pct": _spread(adjusted),
            "floor_ms": floor,
            "ratio_base": _median([a / b for a, b in zip(tm.times, base)]),
            "ratio_floor": _median([a / f for a, f in zip(tm.times, floor_r)]),
            "over_floor_pct_of_base": 100.0 * _median([(a - f) / b for a, f, b in zip(tm.times, floor_r, base)]),
            "component_floor_ms": component,
            "over_component_floor_pct_of_base": 100.0 * (t - component) / t_base,
            "patterns": {f"{p[0]}fb+{p[1]}fwd": k / steps for p, k in sorted(total.items())},
            "times_ms": tm.times,
        }
        mem = memory.get(c.label, {})
        if "peak_bytes" in mem:
            peak = mem["peak_bytes"]
            row["peak_mib"] = peak / MiB
            if mem_base:
                row["mem_ratio_base"] = peak / mem_base
                row["mem_delta_mib"] = (peak - mem_base) / MiB
                row["mem_delta_weights"] = (peak - mem_base) / param_bytes
        for k in ("ops_per_step", "reads_per_step"):
            if k in mem:
                row[k] = mem[k]
        rows.append(row)
    return {"reference": ref, "rows": rows}


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def markdown(model: str, info: dict, summary: dict) -> str:
    ref = summary["reference"]
    lines = [
        f"### {model}: {info['note']}, batch {info['batch']}, {info['device_name']}"
        f"{', ' + info['amp'] + ' autocast' if info['amp'] != 'none' else ''}"
        f"{', channels_last' if info['channels_last'] else ''}",
        "",
        f"fb = {ref['fb_ms']:.2f} ms, fwd = {ref['fwd_ms']:.2f} ms, upd = {ref['upd_ms']:.3f} ms, "
        f"base step = {ref['base_ms']:.2f} ms (fb + upd = {ref['base_floor_ms']:.2f} ms); "
        f"weights {ref['param_bytes'] / MiB:.2f} MiB",
        "",
        "floors measured as one unit: " + ", ".join(f"{k} = {v:.2f} ms" for k, v in ref["floors_ms"].items()),
        "",
        "| method | fb/step | fwd/step | ms/step | ±% | × base | × floor | over floor, % of base | "
        "peak MiB | mem × base | Δmem (× weights) | ops/step | item()/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['method']} | {r['fb_per_step']:.2f} | {r['fwd_per_step']:.2f} | {r['ms']:.2f} | "
            f"{r['spread_pct']:.0f} | {r['ratio_base']:.3f} | {r['ratio_floor']:.3f} | "
            f"{r['over_floor_pct_of_base']:+.1f} | {_fmt(r.get('peak_mib'), '.1f')} | "
            f"{_fmt(r.get('mem_ratio_base'), '.3f')} | {_fmt(r.get('mem_delta_weights'), '+.2f')} | "
            f"{_fmt(r.get('ops_per_step'), '.0f')} | {_fmt(r.get('reads_per_step'), '.1f')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument("--models", default=None,
                    help="comma list of smallcnn, mlp, resnet18, vit_s16 (default: smallcnn on CPU; "
                         "resnet18,vit_s16 on CUDA)")
    ap.add_argument("--methods", default=None,
                    help="comma list of registered methods and naive-sam; hyperparameters as name:key=value "
                         "(several: name:k1=v1;k2=v2), e.g. 'sam:rho=0.1,gasam:steps=3,naive-sam'. Default: every "
                         "registered method (the registered 'base' shows as fm.base) and naive-sam; the plain torch "
                         "step 'base' is always measured")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per candidate (default 100)")
    ap.add_argument("--block", type=int, default=None,
                    help="steps per timed block; blocks of all candidates are interleaved round-robin "
                         "(default 10: a multiple of LookSAM's k=5 and SSAM's interval=10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per candidate first (default 3 CPU, 5 CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    ap.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                    help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    ap.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                    help="auto: ResNet-18 in channels_last on CUDA")
    ap.add_argument("--fused", action="store_true", help="fused=True for the base SGD (default: torch's default)")
    ap.add_argument("--clock", choices=("auto", "wall", "process"), default="auto",
                    help="CPU timer: 'process' (CPU time of this process; robust to other load on the machine) or "
                         "'wall'; auto: process with one thread, wall otherwise. CUDA always uses CUDA events")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--mem-steps", type=int, default=None, help="steps in the memory (and op count) window, after one step that creates the state (default 10: "
                         "covers a LookSAM (k=5) SAM step and an SSAM (interval=10) mask refresh)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory / op-count phase")
    ap.add_argument("--no-count-ops", dest="count_ops", action="store_false", help="skip counting ops per step")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads on CPU (default 1: OpenMP threads spin at barriers, so on a busy or "
                         "shared machine several threads make timings erratic; 0 keeps torch's default)")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny model, few steps)")
    ap.add_argument("--toy", action="store_true",
                    help="the chosen models (--models) at toy sizes: same architectures, under 50k weights, "
                         "batch 4 (steps and timing as given; gpu_check.sh --dry-run runs this on the CPU)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def main(argv: Optional[list[str]] = None) -> dict:
    threads = torch.get_num_threads()
    try:
        return _main(build_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict:
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads and not cuda:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True

    if args.clock == "auto":
        args.clock = "wall" if cuda or torch.get_num_threads() != 1 else "process"
    if args.quick:
        args.steps = args.steps or 4
        args.block = args.block or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.mem_steps = args.mem_steps or 2
    args.steps = args.steps or 100
    args.block = args.block or 10
    args.warmup = (5 if cuda else 2) if args.warmup is None else args.warmup
    args.mem_steps = args.mem_steps or 10

    specs = toy_specs() if args.toy else model_specs()
    if args.quick and args.models is None:
        chosen = [QUICK_SPEC]
    else:
        names = args.models.split(",") if args.models else (["resnet18", "vit_s16"] if cuda else ["smallcnn"])
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(specs)}")
        chosen = [specs[n] for n in names]
    # Methods that need a PEFT model (Flat-LoRA, SAM-LoRA) are not measured on these plain models.
    plain = [m for m in fm.available() if "model" not in fm.hyperparameters(m)]
    methods = args.methods.split(",") if args.methods else plain + [NAIVE]
    methods = [m.strip() for m in methods if m.strip()]
    amp = {"none": None, "bf16": torch.bfloat16}.get(args.amp, torch.bfloat16 if cuda else None)

    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                                   f"{torch.get_num_threads()} threads)"
    results: dict[str, Any] = {
        "device": device_name, "torch": torch.__version__, "flatminima": fm.__version__,
        "base_optimizer": f"SGD(lr={args.lr}, momentum=0.9, weight_decay={args.weight_decay}"
                          f"{', fused=True' if args.fused else ''})",
        "steps": args.steps, "block": args.block, "warmup": args.warmup, "models": {},
    }
    tables = []
    for spec in chosen:
        channels_last = cuda and spec.channels_last if args.channels_last == "auto" else args.channels_last == "on"
        batch = args.batch_size or spec.batch
        log(f"[{spec.name}] batch {batch} on {device_name}")
        wl = Workload(spec, device, amp, channels_last, batch)
        cands = reference_candidates(args) + step_candidates(methods, args)
        t0 = time.perf_counter()
        timings, floors = measure_times(wl, cands, args, log)
        log(f"  timing: {time.perf_counter() - t0:.1f} s")
        param_bytes = wl.param_bytes
        memory: dict[str, dict] = {}
        if args.memory:
            t0 = time.perf_counter()
            for c in cands:
                if c.kind == "step":
                    memory[c.label] = measure_memory(wl, c, args)
            log(f"  memory/op counts: {time.perf_counter() - t0:.1f} s")
        summary = summarize(timings, memory, cands, floors, param_bytes)
        info = {"note": spec.note, "batch": batch, "device_name": device_name,
                "amp": "bf16" if amp is torch.bfloat16 else "none", "channels_last": channels_last}
        results["models"][spec.name] = {**info, **summary}
        table = markdown(spec.name, info, summary)
        tables.append(table)
        print(table + "\n", flush=True)
        del wl
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    results["tables"] = tables
    return results


if __name__ == "__main__":
    main()
