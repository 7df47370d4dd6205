"""Benchmark of the job's parallelism: edits per second for several (editors, shards per editor) layouts, in
one run, on the same edits, with the final states compared (shards are independent, so every layout must
produce the same side memories)."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator import cluster
from orchestrator.config import JobConfig, build_config
from orchestrator.job import run_job
from wise.state import read_state

logger = logging.getLogger(__name__)

DEFAULT_LAYOUTS = ((1, 1), (1, 4), (2, 1))


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel()), default=0.0)


def shards_benchmark(
    cfg: JobConfig,
    n_edits: int,
    layouts: tuple[tuple[int, int], ...] = DEFAULT_LAYOUTS,
    cpus: float | None = None,
) -> dict[str, Any]:
    """Run the same ``n_edits`` under each ``(editors, shards_per_editor)`` layout and time the editing phase.

    Args:
        cfg: the job config (stream, model, WISE settings); output, checkpoint and evaluation are overridden.
        n_edits: edits per layout.
        layouts: the layouts to compare; the first is the baseline of the ratios.
        cpus: CPUs shared by each layout's editors (default: every CPU of this machine).

    Returns:
        ``edits_per_second`` per layout, ``speedup`` against the first layout, ``max_state_diff`` of each final
        state against the first layout's, and the machine.
    """
    cpus = cpus or float(os.cpu_count() or 1)
    started = cluster.connect(cfg.runtime)
    work = Path(tempfile.mkdtemp(prefix="wisestream-bench-"))
    results: dict[str, Any] = {"edits": n_edits, "layouts": {}}
    states: dict[str, dict[str, torch.Tensor]] = {}
    try:
        base = cfg.model_dump(mode="json")
        for editors, per in layouts:
            name = f"{editors}x{per}"
            tree = {
                **base,
                "max_edits": n_edits,
                "output": {"dir": str(work / name)},
                "checkpoint": {"dir": str(work / name / "checkpoint"), "every": None},
                "eval": {"generate": False, "max_records": 1, "every": None},
                "runtime": {
                    **base["runtime"],
                    "editors": editors,
                    "shards_per_editor": per,
                    "editor_cpus": cpus / editors,
                },
            }
            logger.info("layout %s: %d editors x %d shards each", name, editors, per)
            t0 = time.perf_counter()
            report = run_job(build_config(tree))
            rt = report["runtime"]
            results["layouts"][name] = {
                "editors": editors,
                "shards_per_editor": per,
                "edits_per_second": rt["edits_per_second"],
                "seconds_per_edit": report["seconds_per_edit"],
                "wall_seconds": time.perf_counter() - t0,
                "mean_steps": report["router"]["mean_steps"],
            }
            states[name] = read_state(work / name / "state")[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if started:
            import ray

            ray.shutdown()
    first = next(iter(results["layouts"]))
    base_eps = results["layouts"][first]["edits_per_second"]
    out = {
        **{f"edits_per_second_{k}": v["edits_per_second"] for k, v in results["layouts"].items()},
        **{
            f"speedup_{k}": v["edits_per_second"] / base_eps
            for k, v in results["layouts"].items()
            if k != first
        },
        "max_state_diff": {k: _max_abs_diff(states[k], states[first]) for k in states if k != first},
        **results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    return out
