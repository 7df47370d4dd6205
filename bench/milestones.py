"""One resumable sequential run of the quality benchmark: apply a stream of edits in order and measure the first T
edits at each milestone T (:func:`sequential_run`), inline or, with ``defer``, on a copy of the state that
:func:`evaluate_deferred` measures in another process.

The editor state (safetensors + JSON) and ``progress.json`` are written every ``checkpoint_every`` edits and at
each milestone, and a milestone's result file is its commit point: the same call again continues from the last
checkpoint and never recomputes a finished milestone. An evaluation keeps its probes per slice of records as they
finish, so a long one stopped part-way resumes too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from orchestrator.config import ConfigError
from wise.state import atomic_write

logger = logging.getLogger(__name__)


class SequentialEditor(Protocol):
    """What a run needs from an editor (WiseEditor and the baselines all offer it)."""

    model: torch.nn.Module
    routed: Any
    tokens: Any

    @property
    def n_edits(self) -> int: ...

    def prepare(self) -> None: ...

    def apply(self, edits: Sequence[Any]) -> list[Any]: ...

    def save(self, directory: str | Path) -> Path: ...

    def load(self, directory: str | Path) -> None: ...


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=1) + "\n"))


def milestone_path(results_dir: Path, t: int) -> Path:
    return results_dir / f"T{t}.json"


def sequential_run(
    make: Callable[[], SequentialEditor],
    records: Sequence[Any],
    milestones: Sequence[int],
    work_dir: Path,
    results_dir: Path,
    *,
    fingerprint: dict[str, Any],
    evaluate: Callable[[SequentialEditor, Sequence[Any], Path], dict[str, Any]],
    checkpoint_every: int = 10,
    extra: dict[str, Any] | None = None,
    positions: dict[int, int] | None = None,
    defer: bool = False,
) -> list[int]:
    """Apply ``records`` in order, evaluating the first T edits at each milestone T, resumably.

    Args:
        make: builds a fresh editor (the model is loaded only when some milestone is left to do).
        records: the stream, at least ``max(milestones)`` long.
        milestones: increasing T's to evaluate.
        work_dir: where the editor state and ``progress.json`` live.
        results_dir: where ``T{t}.json`` results go (a finished milestone is never recomputed).
        fingerprint: what the state depends on (method settings, data, model); a resumed state written with
            another fingerprint is refused.
        evaluate: metrics of an editor on records; its third argument is a directory where it may keep partial
            results of that milestone (deleted once the milestone's result is written).
        checkpoint_every: edits between state checkpoints.
        extra: fields added to every result (command, machine).
        positions: where milestone T lies in ``records`` when other records are mixed in (default T).
        defer: at each milestone keep a copy of the state (``milestone-T<t>/``) and go on editing;
            :func:`evaluate_deferred` measures the copies, e.g. in a second process on another core. A milestone
            with such a copy counts as reached, in either mode.

    Returns:
        The milestones evaluated by this call (with ``defer``: kept for evaluation).

    Raises:
        ConfigError: the state in ``work_dir`` belongs to other settings, or lies past an unfinished milestone.
    """
    todo = [
        t
        for t in milestones
        if not milestone_path(results_dir, t).exists()
        and not (_snapshot_dir(work_dir, t) / "milestone.json").exists()
    ]
    if not todo:
        return []
    work_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(work_dir / ".lock") as held:
        if not held:  # one process per run: a second command on the same run stops instead of corrupting it
            raise ConfigError(f"{work_dir} is being run by another process")
        editor, progress = resume_editor(make, work_dir, fingerprint)
        done = []
        for t in todo:
            end = (positions or {}).get(t, t)
            if editor.n_edits > end:
                raise ConfigError(
                    f"{work_dir}: state has {editor.n_edits} edits, past milestone T={t}: delete it"
                )
            edit_until(editor, records, end, progress, work_dir, checkpoint_every)
            editing = {
                "seconds_per_edit": progress["edit_seconds"] / end,
                "mean_steps": sum(progress["steps"][:end]) / end,
            }
            if defer:
                _keep_copy(work_dir, t, end, {**editing, "edit_command": (extra or {}).get("command")})
            else:
                cache = work_dir / f"eval-T{t}"
                _evaluate_milestone(editor, records[:end], t, cache, results_dir, evaluate, editing, extra)
            done.append(t)
        return done


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` for the block; yields False (without waiting) when another process
    holds it."""
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _snapshot_dir(work_dir: Path, t: int) -> Path:
    return work_dir / f"milestone-T{t}"


def state_part(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What of a run's fingerprint its state depends on: all but the keyed layout's routing-only settings
    (:data:`wise.config.KEYED_ROUTING_ONLY`), which change how queries are routed, not what the edits wrote.
    A keyed setting added after the run was recorded takes the value such runs were made with
    (:data:`wise.config.KEYED_ADDED`)."""
    from wise.config import KEYED_ADDED, KEYED_ROUTING_ONLY

    keyed = fingerprint.get("settings", {}).get("keyed")
    if not isinstance(keyed, dict):
        return fingerprint
    settings = {
        **fingerprint["settings"],
        "keyed": {k: v for k, v in {**KEYED_ADDED, **keyed}.items() if k not in KEYED_ROUTING_ONLY},
    }
    return {**fingerprint, "settings": settings}


def resume_editor(
    make, work_dir: Path, fingerprint: dict[str, Any]
) -> tuple[SequentialEditor, dict[str, Any]]:
    """A prepared editor holding the run's checkpointed state (none: a fresh one), and the run's progress."""
    progress_path = work_dir / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else None
    if progress is not None and state_part(progress["fingerprint"]) != state_part(fingerprint):
        raise ConfigError(f"{work_dir} holds a run with other settings: delete it to start over")
    editor = make()
    if (
        progress is not None
    ):  # loading first: the state holds templates and margins, prepare() then skips them
        editor.load(work_dir / "state")
        if editor.n_edits != progress["applied"]:
            raise ConfigError(
                f"{work_dir}: state holds {editor.n_edits} edits, progress says {progress['applied']}"
            )
        logger.info("resuming %s at %d edits", work_dir, editor.n_edits)
    else:
        progress = {"fingerprint": fingerprint, "applied": 0, "edit_seconds": 0.0, "steps": []}
    editor.prepare()  # one-time setup outside the timed edits
    return editor, progress


def edit_until(
    editor, records, end: int, progress: dict[str, Any], work_dir: Path, checkpoint_every: int
) -> None:
    """Apply ``records`` up to position ``end``, checkpointing the state and ``progress`` every
    ``checkpoint_every`` edits (the state first: a crash between them resumes the state)."""
    while editor.n_edits < end:
        n = editor.n_edits
        upto = min(end, (n // checkpoint_every + 1) * checkpoint_every)
        t0 = time.perf_counter()
        outcomes = editor.apply(records[n:upto])
        progress["edit_seconds"] += time.perf_counter() - t0
        progress["steps"] += [o.steps for o in outcomes]
        progress["applied"] = editor.n_edits
        editor.save(work_dir / "state")
        write_json(work_dir / "progress.json", progress)
        logger.info(
            "%s: %d edits, %.2f s/edit", work_dir, editor.n_edits, progress["edit_seconds"] / editor.n_edits
        )


def _keep_copy(work_dir: Path, t: int, end: int, editing: dict[str, Any]) -> None:
    """Copy the state at milestone T for :func:`evaluate_deferred`; ``milestone.json`` is the copy's commit point
    and carries the editing run's figures (seconds per edit, steps, its command) into the result."""
    snap = _snapshot_dir(work_dir, t)
    shutil.rmtree(snap, ignore_errors=True)
    shutil.copytree(work_dir / "state", snap / "state")
    write_json(snap / "milestone.json", {"T": t, "end": end, **editing})
    logger.info("%s: T=%d kept for evaluation in %s (--eval-deferred measures it)", work_dir, t, snap)


def _evaluate_milestone(editor, records, t, cache, results_dir, evaluate, editing, extra) -> None:
    """Measure ``editor`` on ``records`` (the first T edits) and write milestone T's result; the evaluation keeps
    its probes under ``cache`` as they finish (a stopped evaluation resumes) and deletes them once written."""
    t0 = time.perf_counter()
    metrics = evaluate(editor, records, cache)
    result = {"T": t, **metrics, **editing, "eval_seconds": time.perf_counter() - t0, **(extra or {})}
    write_json(milestone_path(results_dir, t), result)
    shutil.rmtree(cache, ignore_errors=True)
    logger.info("%s T=%d: %s", results_dir, t, metrics.get("teacher_forced"))


def evaluate_deferred(
    make: Callable[[], SequentialEditor],
    records: Sequence[Any],
    work_dir: Path,
    results_dir: Path,
    *,
    evaluate: Callable[[SequentialEditor, Sequence[Any], Path], dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> list[int]:
    """Measure the milestone states that :func:`sequential_run` kept with ``defer`` (oldest first), write their
    results as an inline evaluation would (same fields; seconds per edit from the editing run) and delete each
    copy once its result is written. Safe beside the editing process; a copy another evaluator holds is skipped.

    Returns:
        The milestones evaluated by this call.
    """
    done = []
    kept = [(json.loads(f.read_text()), f.parent) for f in work_dir.glob("milestone-T*/milestone.json")]
    for meta, snap in sorted(kept, key=lambda k: k[0]["T"]):
        t = meta["T"]
        if milestone_path(results_dir, t).exists():
            shutil.rmtree(snap, ignore_errors=True)
            continue
        with _exclusive(snap / ".lock") as held:
            if not held:
                logger.info("%s is being evaluated by another process", snap)
                continue
            editor = make()
            editor.load(snap / "state")
            if editor.n_edits != meta["end"]:
                raise ConfigError(
                    f"{snap}: state holds {editor.n_edits} edits, milestone T={t} needs {meta['end']}"
                )
            editor.prepare()
            editing = {k: meta[k] for k in ("seconds_per_edit", "mean_steps", "edit_command") if k in meta}
            _evaluate_milestone(
                editor, records[: meta["end"]], t, snap / "eval", results_dir, evaluate, editing, extra
            )
        shutil.rmtree(snap, ignore_errors=True)
        done.append(t)
    return done
