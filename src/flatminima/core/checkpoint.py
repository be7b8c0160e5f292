"""Validation of the state dicts ``FlatOptimizer.load_state_dict`` accepts (docs/semantics.md).

Three layouts: torch's (``state``, ``param_groups``) with the method's part under ``"flatminima"``
(what ``state_dict()`` writes), the same without it (a plain base optimizer's, or one that went
through ``torch.distributed.checkpoint``), and the old ``{"base", "flat"}``. Everything is checked
before anything is loaded, so a refused state dict changes nothing.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from .validation import check, check_int, check_nonnegative, is_int

#: Method-state keys of checkpoints written before each component kept its state under a namespace.
RENAMED_STATE_KEYS = {"looksam_gv": "looksam.gv", "ssam_mask": "ssam.mask", "fisher": "noise.fisher"}


def checked_state_dict(opt: Any, sd: Any) -> tuple[dict, Optional[Mapping]]:
    """``(base optimizer's state dict, the "flatminima" part or None)`` of ``sd`` for ``opt``,
    after validating everything ``opt.load_state_dict`` will apply: the layout, the method name,
    the group count and sizes, the strength and a numeric ``lr`` (finite, ≥ 0), the step counter,
    the per-parameter indices and the trigger's keys."""
    name = type(opt).__name__
    check("state_dict", isinstance(sd, Mapping), type(sd).__name__, "an optimizer state_dict (a mapping)")
    legacy = set(sd) == {"base", "flat"}
    if legacy:
        base_sd, flat = sd["base"], sd["flat"]
        check("state_dict", isinstance(base_sd, Mapping), type(base_sd).__name__, "a mapping under 'base'")
    else:
        check("state_dict", "state" in sd and "param_groups" in sd, sorted(map(str, sd)),
              "torch's keys 'state' and 'param_groups' (and 'flatminima' for a method's own state)")
        base_sd, flat = {k: v for k, v in sd.items() if k != "flatminima"}, sd.get("flatminima")
    groups = base_sd.get("param_groups")
    sizes = [len(g["params"]) for g in opt.param_groups]
    ok = isinstance(groups, Sequence) and all(isinstance(g, Mapping) and "params" in g for g in groups)
    check("state_dict", ok and [len(g["params"]) for g in groups] == sizes,
          [len(g["params"]) for g in groups] if ok else type(groups).__name__,
          f"param groups of sizes {sizes}, as {name}'s")
    key = opt.strength_key
    for i, g in enumerate(groups):
        # An old checkpoint always has the strength in every group: one without is another method's.
        check("state_dict", key in g or not legacy, f"param group {i} without {key!r}", f"a {name} state_dict")
        if key in g:
            check_nonnegative(f"{key} (param group {i} of the state_dict)", g[key])
        if "lr" in g and not torch.is_tensor(g["lr"]):
            check_nonnegative(f"lr (param group {i} of the state_dict)", g["lr"])
    if flat is None:
        return base_sd, None
    check("state_dict", isinstance(flat, Mapping) and {"step", "state", "trigger"} <= set(flat),
          type(flat).__name__, "a 'flatminima' entry with 'step', 'state' and 'trigger'")
    method = flat.get("method", opt.method_name)  # old checkpoints do not name it
    check("state_dict", method == opt.method_name, f"a state_dict of {method!r}",
          f"one of {opt.method_name!r} ({name}) or of a plain {type(opt.base).__name__}: build a {method!r} "
          "method to load it")
    check_int("step (state_dict)", flat["step"], 0)
    count = sum(sizes)
    own = flat["state"]
    ok = isinstance(own, Mapping) and all(is_int(i) and 0 <= i < count and isinstance(s, Mapping)
                                          for i, s in own.items())
    check("state_dict", ok, "method state", f"per-parameter method state keyed by index in [0, {count})")
    trigger = flat["trigger"]
    expected = set(opt.trigger.state_dict())
    check("state_dict", isinstance(trigger, Mapping) and set(trigger) == expected,
          sorted(trigger) if isinstance(trigger, Mapping) else trigger,
          f"trigger state with keys {sorted(expected)} ({name}'s)")
    renamed = {i: {RENAMED_STATE_KEYS.get(k, k): v for k, v in s.items()} for i, s in own.items()}
    return base_sd, {**flat, "state": renamed}
