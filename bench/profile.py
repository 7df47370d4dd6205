"""``wisestream bench profile``: where the seconds of an edit go, and the whole job's edits/s against the engine's.

Two measurements on the same edits and the same config, in one run:

- **engine**: what an editor actor does for the job, in this process and without Ray: shards trained in lock
  step (``runtime.shards_per_editor`` at a time, :meth:`train` of the layout's trainer), stored into the memory
  bank and merged on its cadence. Each stage is timed by wrapping the function that does it:

  ========================  =====================================================================
  ``tokenise``              tokenising and batching the edit rows (prompt under every template)
  ``frozen_prefix``         the forward pass below the edited layer, once per edit
  ``upper_forward``         the blocks above the edited layer and the label logits, once per step
  ``backward``              gradients of the edit's columns, once per step
  ``optimizer``             the Adam update and the convergence test (rest of the step loop)
  ``keys_and_write``        the edit's relation key, writing its columns into the shard
  ``store_and_merge``       storing finished shards and merging groups into their block
  ``checkpoint``            writing the state (tensors + metadata) as often as the job commits one
  ``transfer``              pickling and unpickling what an editor call returns (a lower bound of
                            Ray's object-store transfer)
  ========================  =====================================================================

  ``checkpoint`` and ``transfer`` are work the job does and the bare engine does not: they are measured beside
  the engine loop and not counted in the engine's edits/s.

- **job**: the real job (:func:`orchestrator.job.run_job`: Ray actors, checkpoints, the evaluator when
  ``eval.every`` is set) on the same edits, once with the config as given and once with continuous evaluation
  off. Its edits/s is the report's (applied edits over the editing loop's seconds).

The result gives seconds per edit of each stage, the engine's and each job's edits/s, and ``job / engine``.
"""

from __future__ import annotations

import copy
import logging
import pickle
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.inputs import irrelevant_pool, stream_sample
from orchestrator.model_store import load_model
from wise.factory import make_bank, make_trainer
from wise.state import compose_state, write_state

logger = logging.getLogger(__name__)

# Each speed lever of the default editor switched off on its own (config overrides; ``threads`` sets torch's
# thread count): ``bench profile --levers`` times the engine under each, on the same edits.
LEVERS: dict[str, dict[str, Any]] = {
    "early stop off (every edit runs keyed.n_iter steps)": {"set": ["wise.keyed.early_stop_loss=0"]},
    "one shard per call (no lock-step batch of a merge group)": {"set": ["runtime.shards_per_editor=1"]},
    "one torch thread": {"threads": 1},
}

ENGINE_STAGES = (
    "tokenise",
    "frozen_prefix",
    "upper_forward",
    "backward",
    "optimizer",
    "keys_and_write",
    "store_and_merge",
)


class StageClock:
    """Seconds spent per stage, by wrapping the callables that do each stage (exclusive of nothing: a stage
    that runs inside another is subtracted by the caller, :func:`engine_profile`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def timed(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - t0
                self.calls[stage] += 1

        return wrapper

    @contextmanager
    def patch(self, owner: Any, name: str, stage: str) -> Iterator[None]:
        """Time ``owner.name`` as ``stage`` inside the block (an instance or a class attribute)."""
        original = getattr(owner, name)
        setattr(owner, name, self.timed(stage, original))
        try:
            yield
        finally:
            if isinstance(owner, type):
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the instance attribute goes; the class's method shows again


def engine_profile(cfg: JobConfig, records: list, model=None, tokenizer=None) -> dict[str, Any]:
    """Apply ``records`` the way one editor actor and the job's memory bank do, timing each stage (module
    docstring). Returns ``{"edits", "seconds", "edits_per_second", "steps_per_edit", "stages": {stage:
    seconds per edit}, "checkpoints", "checkpoint_bytes", "transfer_bytes"}``."""
    if model is None:
        model, tokenizer = load_model(cfg)
    wise, rt = cfg.wise, cfg.runtime
    trainer = make_trainer(model, tokenizer, wise, irrelevant_pool(cfg))
    trainer.prepare()
    bank = make_bank(wise, trainer.transposed)
    clock = StageClock()
    save, group = wise.save_freq, rt.shards_per_editor
    limit = cfg.checkpoint.every or save  # edits per shard between the job's commits
    engine = trainer.engine
    module, shape = trainer.layout.module_path, trainer.routed.weight.shape
    steps = 0
    checkpoints = 0
    ckpt_bytes = transfer_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        patches = [
            (trainer.tokens, "collate", "tokenise"),
            (trainer.tokens, "row", "tokenise"),
            (engine, "frozen_prefix", "frozen_prefix"),
            (engine, "label_loss", "upper_forward"),
            (torch.Tensor, "backward", "backward"),
            (trainer, "_fit", "fit"),
            (trainer, "step", "step"),
            (trainer, "_relation_keys", "keys"),
            (bank, "store", "store_and_merge"),
            (bank, "merge", "store_and_merge"),
        ]
        with _patched(clock, patches):
            t_start = time.perf_counter()
            excluded = 0.0
            for first in range(0, len(records), save * group):
                chunk = records[first : first + save * group]
                shard0 = first // save
                todo = [chunk[i : i + save] for i in range(0, len(chunk), save)]
                shards = [trainer.new_shard(shard0 + i, bank.base()) for i in range(len(todo))]
                starts = [first + i * save for i in range(len(todo))]
                while any(len(s.edit_ids) < len(t) for s, t in zip(shards, todo, strict=True)):
                    left = [t[len(s.edit_ids) :] for s, t in zip(shards, todo, strict=True)]
                    outs = trainer.train(shards, starts, left, limit)
                    steps += sum(o.steps for out in outs for o in out)
                    t0 = time.perf_counter()
                    payload = pickle.dumps([s.detached() for s in shards], protocol=5)
                    pickle.loads(payload)
                    t1 = time.perf_counter()
                    tensors, meta = compose_state(
                        wise, module, shape, trainer.setup_state(), bank, shards[-1]
                    )
                    write_state(Path(tmp) / "state", tensors, meta)
                    t2 = time.perf_counter()
                    clock.seconds["transfer"] += t1 - t0
                    clock.seconds["checkpoint"] += t2 - t1
                    excluded += t2 - t0
                    checkpoints += 1
                    transfer_bytes += len(payload)
                    ckpt_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
                for s in shards:
                    bank.store(s)
            elapsed = time.perf_counter() - t_start - excluded
    n = len(records)
    sec = clock.seconds
    stages = {
        "tokenise": sec["tokenise"],
        "frozen_prefix": sec["frozen_prefix"],
        "upper_forward": sec["upper_forward"],
        "backward": sec["backward"],
        "optimizer": sec["fit"] - sec["upper_forward"] - sec["backward"],
        "keys_and_write": sec["step"] - sec["fit"] - sec["frozen_prefix"] - sec["tokenise"],
        "store_and_merge": sec["store_and_merge"],
    }
    stages["other"] = elapsed - sum(stages.values())
    stages.update({"checkpoint": sec["checkpoint"], "transfer": sec["transfer"]})
    return {
        "edits": n,
        "seconds": elapsed,
        "edits_per_second": n / elapsed,
        "steps_per_edit": steps / n,
        "stages": {k: v / n for k, v in stages.items()},
        "checkpoints": checkpoints,
        "checkpoint_bytes": ckpt_bytes // max(checkpoints, 1),
        "transfer_bytes": transfer_bytes // max(checkpoints, 1),
    }


@contextmanager
def _patched(clock: StageClock, patches: list[tuple[Any, str, str]]) -> Iterator[None]:
    with ExitStack() as stack:
        for owner, name, stage in patches:
            stack.enter_context(clock.patch(owner, name, stage))
        yield


def job_rate(cfg: JobConfig, records: list, out_dir: Path) -> dict[str, Any]:
    """Run the real job on ``records`` into ``out_dir``; its edits/s and seconds from the report."""
    from orchestrator.job import run_job

    job_cfg = cfg.model_copy(
        update={
            "output": cfg.output.model_copy(update={"dir": str(out_dir)}),
            "max_edits": len(records),
            "publish": cfg.publish.model_copy(update={"replicas": 0}),
        }
    )
    report = run_job(job_cfg, records=records)
    return {
        "edits": report["edits_applied_this_run"],
        "edits_per_second": report["runtime"]["edits_per_second"],
        "seconds_per_edit": report["seconds_per_edit"],
        "wall_seconds": report["wall_seconds"],
        "evaluations": len(report.get("evaluations") or []),
    }


def lever_variants(cfg: JobConfig) -> dict[str, tuple[JobConfig, int]]:
    """Per lever of :data:`LEVERS`: the config with that lever off, and the torch threads to run it with."""
    from orchestrator.config import build_config

    base = cfg.model_dump(mode="json")
    out = {}
    for name, lever in LEVERS.items():
        out[name] = (
            build_config(base, lever.get("set", [])),
            lever.get("threads", torch.get_num_threads()),
        )
    return out


def lever_gains(cfg: JobConfig, records: list, model, tokenizer, default: dict[str, Any]) -> dict[str, Any]:
    """Engine seconds per edit with each lever off, and its gain: that time over the default's."""
    out = {}
    threads = torch.get_num_threads()
    for name, (variant, n_threads) in lever_variants(cfg).items():
        logger.info("bench profile: lever off: %s", name)
        torch.set_num_threads(n_threads)
        try:
            res = engine_profile(variant, records, copy.deepcopy(model), tokenizer)
        finally:
            torch.set_num_threads(threads)
        out[name] = {
            "seconds_per_edit": 1 / res["edits_per_second"],
            "steps_per_edit": res["steps_per_edit"],
            "threads": n_threads,
            "gain": default["edits_per_second"] / res["edits_per_second"],
        }
    return out


def profile_benchmark(
    cfg: JobConfig, n_edits: int = 20, job: bool = True, levers: bool = False
) -> dict[str, Any]:
    """The engine's stage profile; with ``levers``, its time with each lever off; with ``job``, the job's
    edits/s with and without continuous evaluation; all on the first ``n_edits`` edits of the config's stream
    (module docstring)."""
    records = stream_sample(cfg, n_edits, "bench profile")
    model, tokenizer = load_model(cfg)
    out: dict[str, Any] = {
        "edits": len(records),
        "threads": torch.get_num_threads(),
        "config": {
            "layout": cfg.wise.layout,
            "save_freq": cfg.wise.save_freq,
            "merge_freq": cfg.wise.merge_freq,
            "shards_per_editor": cfg.runtime.shards_per_editor,
            "checkpoint_every": cfg.checkpoint.every,
            "eval_every": cfg.eval.every,
        },
    }
    logger.info("bench profile: engine, %d edits", len(records))
    out["engine"] = engine_profile(cfg, records, copy.deepcopy(model), tokenizer)
    if levers:
        out["levers"] = lever_gains(cfg, records, model, tokenizer, out["engine"])
    del model
    if not job:
        return out
    out["jobs"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"as_configured": cfg}
        if cfg.eval.every is not None:
            sides["eval_off"] = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every": None})})
        for name, side in sides.items():
            logger.info("bench profile: job (%s), %d edits", name, len(records))
            out["jobs"][name] = job_rate(side, records, Path(tmp) / name)
            out["jobs"][name]["ratio_to_engine"] = (
                out["jobs"][name]["edits_per_second"] / out["engine"]["edits_per_second"]
            )
    return out


__all__ = ["ENGINE_STAGES", "LEVERS", "StageClock", "engine_profile", "job_rate", "profile_benchmark"]
