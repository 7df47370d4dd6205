"""The editing job: stream of edits in, WISE-edited state and a retention report out.

Lifecycle (torchtune-recipe style): ``setup()`` loads the model and opens the stream, ``run()`` applies every
edit sequentially with a progress bar and measures retention, ``cleanup()`` closes files. Records come from
the configured file, or from any Python iterable passed as ``records`` (a generator reading a user's system).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from orchestrator.config import JobConfig
from orchestrator.model_store import resolve_model_path
from orchestrator.report import write_report
from streams import DeadLetterFile, EditRecord, EditStream, IterableSource, open_source
from wise.batch import PromptTooLongError
from wise.editor import WiseEditor
from wise.evaluate import evaluate_records

logger = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job cannot start or continue (missing input, unusable model)."""


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(cfg: JobConfig):
    """Load the configured causal LM and tokenizer (materialising the embedded model on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.model.name)
    device = pick_device(cfg.model.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise JobError(f"model.name={cfg.model.name!r} could not be loaded: {err}") from err
    return model.to(device).eval(), tokenizer


def irrelevant_pool(cfg: JobConfig) -> list[tuple[str, str]]:
    """Locality pairs of the records in ``irrelevant.path`` (records that are not edited)."""
    if cfg.irrelevant.path is None:
        return []
    pool: list[tuple[str, str]] = []
    for _, rec in EditStream(open_source(cfg.irrelevant.path, cfg.irrelevant.format)):
        if rec.locality_prompt and rec.locality_answer:
            pool.append((rec.locality_prompt, rec.locality_answer))
        if len(pool) >= cfg.irrelevant.limit:
            break
    if not pool:
        raise JobError(f"irrelevant.path={cfg.irrelevant.path} holds no locality pairs")
    return pool


class EditJob:
    """One run of the editing job.

    Args:
        cfg: the job configuration.
        records: optional iterable of edit records (dicts, JSON strings or ``EditRecord``) used instead of
            ``stream.path``.
        model: optional preloaded ``(model, tokenizer)`` to skip loading (tests, notebooks).
    """

    def __init__(
        self, cfg: JobConfig, records: Iterable[Any] | None = None, model: tuple[Any, Any] | None = None
    ) -> None:
        if records is None and cfg.stream.path is None:
            raise JobError("no edits: set stream.path or pass records=")
        self.cfg = cfg
        self._records = records
        self._preloaded = model
        self.editor: WiseEditor | None = None
        self.stream: EditStream | None = None
        self.dead_letter: DeadLetterFile | None = None
        self.applied: list[EditRecord] = []
        self.outcomes: list[Any] = []
        self.report: dict[str, Any] | None = None
        self.rejected_by_editor = 0  # valid records the editor cannot take (too long, duplicate id)

    def setup(self) -> None:
        """Load model, tokenizer and irrelevant pool; open the stream and the dead-letter file."""
        cfg = self.cfg
        source = (
            IterableSource(self._records)
            if self._records is not None
            else open_source(cfg.stream.path, cfg.stream.format)  # type: ignore[arg-type]
        )
        model, tokenizer = self._preloaded or load_model(cfg)
        self.editor = WiseEditor(model, tokenizer, cfg.wise, irrelevant=irrelevant_pool(cfg))
        self.editor.prepare()
        Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
        self.dead_letter = DeadLetterFile(cfg.dead_letter_path())
        self.stream = EditStream(source, dead_letter=self.dead_letter)

    def _reject(self, position: int, rec: EditRecord, reason: str) -> None:
        logger.warning("edit %s at position %d rejected: %s", rec.id, position, reason)
        assert self.dead_letter is not None
        self.dead_letter.write(
            position=position, source=self.stream.source.name, reason=reason, raw=rec.to_json()
        )
        self.rejected_by_editor += 1

    def run(self) -> dict[str, Any]:
        """Apply the stream, evaluate retention, save the state, and write the report.

        Returns:
            The report (also written to ``output.report``).
        """
        if self.editor is None or self.stream is None:
            self.setup()
        assert self.editor is not None and self.stream is not None
        cfg, editor = self.cfg, self.editor
        start = time.perf_counter()
        bar = tqdm(total=cfg.max_edits, desc="editing", unit="edit", dynamic_ncols=True)
        pending: list[tuple[int, EditRecord]] = []
        edit_seconds = 0.0
        seen_ids: set[str] = set()

        def flush() -> None:
            nonlocal edit_seconds
            if not pending:
                return
            t0 = time.perf_counter()
            outs = editor.apply([r for _, r in pending])
            edit_seconds += time.perf_counter() - t0
            self.outcomes += outs
            self.applied += [r for _, r in pending]
            bar.update(len(pending))
            last = outs[-1]
            bar.set_postfix(
                steps=last.steps, loss=f"{last.loss:.3f}", act=f"{last.activation:.1f}/{last.threshold:.1f}"
            )
            pending.clear()

        def full() -> bool:
            return cfg.max_edits is not None and len(self.applied) + len(pending) >= cfg.max_edits

        for position, rec in self.stream:
            if rec.id in seen_ids:
                self._reject(position, rec, f"duplicate edit id {rec.id!r} (already applied in this job)")
                continue
            try:
                editor.validate(rec)
            except PromptTooLongError as err:
                self._reject(position, rec, str(err))
                continue
            seen_ids.add(rec.id)
            pending.append((position, rec))
            if len(pending) == cfg.wise.batch_size:
                flush()
            if full():  # stop before reading the next record: it stays unread for a later run
                break
        flush()
        bar.close()
        state_dir = editor.save(Path(cfg.output.dir) / "state")
        logger.info("applied %d edits in %.1f s; measuring retention", len(self.applied), edit_seconds)
        self.report = self._report(start, edit_seconds, state_dir)
        write_report(self.report, cfg.report_path())
        return self.report

    def _report(self, start: float, edit_seconds: float, state_dir: Path) -> dict[str, Any]:
        assert self.editor is not None and self.stream is not None
        editor, cfg = self.editor, self.cfg
        sample = self.applied[: cfg.eval.max_records] if cfg.eval.max_records else self.applied
        args = (editor.model, editor.routed, editor.tokens, sample)
        post = evaluate_records(*args, generate=cfg.eval.generate)
        pre = evaluate_records(*args, main_only=True, generate=cfg.eval.generate)
        n = len(self.applied)
        return {
            "edits_seen": self.stream.seen,
            "edits_applied": n,
            "dead_lettered": self.stream.rejected + self.rejected_by_editor,
            "evaluated_edits": len(sample),
            "retention": post["teacher_forced"],
            "retention_generate": post.get("generate"),
            "pre": pre["teacher_forced"],
            "pre_generate": pre.get("generate"),
            "routed_fraction": post["routed_fraction"],
            "score_over_threshold": post["score_over_threshold"],
            "router": {
                "memories": [
                    {"edits": len(m.edit_ids), "shards": m.shard_ids, "threshold": m.threshold}
                    for m in editor.routable()
                ],
                "margins": None if editor.margins is None else vars(editor.margins),
                "mean_steps": sum(o.steps for o in self.outcomes) / n if n else None,
            },
            "seconds_per_edit": edit_seconds / n if n else None,
            "wall_seconds": time.perf_counter() - start,
            "state_dir": str(state_dir),
            "dead_letter": str(cfg.dead_letter_path())
            if self.stream.rejected + self.rejected_by_editor
            else None,
            "per_edit": post["per_edit"],
            "config": cfg.model_dump(mode="json"),
        }

    def cleanup(self) -> None:
        """Close the dead-letter file (idempotent)."""
        if self.dead_letter is not None:
            self.dead_letter.close()


def run_job(
    cfg: JobConfig, records: Iterable[Any] | None = None, model: tuple[Any, Any] | None = None
) -> dict:
    """Run a whole job (setup, run, cleanup) and return its report."""
    job = EditJob(cfg, records=records, model=model)
    try:
        job.setup()
        return job.run()
    finally:
        job.cleanup()
