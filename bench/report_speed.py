"""REPORT.md sections on edit speed: ``engines.json`` (``wisestream bench engines``: the default editor against
the 2-edit editor and WISE's reference settings) and ``profile.json`` (``wisestream bench profile``: seconds per
edit by stage, and the whole job's edits/s against the engine's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

STAGE_LABELS = {
    "tokenise": "tokenise and batch the edit's rows",
    "frozen_prefix": "frozen prefix (layers below the edit, once per edit)",
    "upper_forward": "blocks above the edited layer + label logits (every step)",
    "backward": "backward to the edit's columns (every step)",
    "optimizer": "Adam update, convergence test",
    "keys_and_write": "relation key, write columns",
    "store_and_merge": "store shards, merge into blocks",
    "other": "unattributed (lock-step bookkeeping)",
    "checkpoint": "checkpoint write (job only)",
    "transfer": "pickle round trip of an editor call's result (job only, lower bound of Ray's transfer)",
}


def engines_section(rec: dict[str, Any] | None, machine_line: Callable[[dict | None], str]) -> list[str]:
    if rec is None:
        return [
            "Editors compared not measured yet: run `wisestream bench engines --edits 10 --out "
            "benchmarks/results/engines.json`.",
            "",
        ]
    r = rec["result"]
    lines = [
        f"Seconds per edit of three editors on the same {r['edits']} edits of the same model, one run "
        "(`default`: the keyed layout of `configs/default.yaml`; `2-edit`: `configs/wise-2edit.yaml`; "
        "`reference`: that config with WISE's reference settings: margins 5/20/10, one irrelevant input, a full "
        "forward pass per step):",
        "",
        "| editor | s/edit | steps/edit | Rel | Gen | Loc | Rel (gen.) | Gen (gen.) | x default |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    default = r["sides"]["default"]["seconds_per_edit"]
    for name, side in r["sides"].items():
        tf, gen = side["metrics"]["teacher_forced"], side["metrics"].get("generate", {})
        lines.append(
            f"| {name} | {side['seconds_per_edit']:.2f} | {side['steps_per_edit']:.1f} | "
            f"{tf['reliability']:.3f} | {tf['generalization']:.3f} | {tf['locality']:.3f} | "
            f"{gen.get('reliability', float('nan')):.3f} | {gen.get('generalization', float('nan')):.3f} | "
            f"{side['seconds_per_edit'] / default:.1f} |"
        )
    lines += ["", f"Command: `{rec['command']}`. Machine: {machine_line(rec.get('machine'))}.", ""]
    return lines


def profile_section(rec: dict[str, Any] | None, machine_line: Callable[[dict | None], str]) -> list[str]:
    if rec is None:
        return [
            "Per-stage profile not measured yet: run `wisestream bench profile --out "
            "benchmarks/results/profile.json`.",
            "",
        ]
    r = rec["result"]
    eng = r["engine"]
    total = 1.0 / eng["edits_per_second"]
    cfg = r["config"]
    lines = [
        f"Where an edit's seconds go: the default job's editor work ({r['edits']} edits, "
        f"{cfg['shards_per_editor']} shards trained in lock step, {eng['steps_per_edit']:.1f} Adam steps per edit, "
        f"{r['threads']} torch thread(s)), each stage timed by wrapping the function that does it:",
        "",
        "| stage | s/edit | share of the engine |",
        "| --- | --- | --- |",
    ]
    for stage, sec in eng["stages"].items():
        share = "" if stage in ("checkpoint", "transfer") else f"{100 * sec / total:.1f}%"
        lines.append(f"| {STAGE_LABELS.get(stage, stage)} | {sec:.3f} | {share} |")
    lines += [f"| **engine total** | **{total:.3f}** | 100% |", ""]
    levers = r.get("levers") or {}
    if levers:
        lines += [
            "Each speed lever of the default editor switched off on its own, same edits (gain: seconds per edit "
            "without the lever over seconds per edit with all levers on):",
            "",
            "| lever off | s/edit | steps/edit | gain of the lever |",
            "| --- | --- | --- | --- |",
        ]
        for name, lever in levers.items():
            lines.append(
                f"| {name} | {lever['seconds_per_edit']:.2f} | {lever['steps_per_edit']:.1f} | "
                f"{lever['gain']:.2f}x |"
            )
        lines.append("")
    jobs = r.get("jobs") or {}
    if jobs:
        lines += [
            "The whole job (Ray actors, a checkpoint every edit per shard, the evaluator) on the same edits:",
            "",
            "| job | s/edit | edits/s | x engine's edits/s | continuous evaluations |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, job in jobs.items():
            lines.append(
                f"| {name.replace('_', ' ')} | {1 / job['edits_per_second']:.2f} | "
                f"{job['edits_per_second']:.3f} | {job['ratio_to_engine']:.2f} | {job['evaluations']} |"
            )
        lines.append("")
    lines += [f"Command: `{rec['command']}`. Machine: {machine_line(rec.get('machine'))}.", ""]
    return lines


def edit_speed_section(
    engines: dict[str, Any] | None, profile: dict[str, Any] | None, machine_line: Callable[[dict | None], str]
) -> list[str]:
    """The editors compared (``engines.json``), then the per-stage profile and the job against its engine
    (``profile.json``), as ``###`` sections; each says how to measure it when its record is missing."""
    return [
        "### Seconds per edit: the default editor, the 2-edit editor, WISE's reference settings",
        "",
        *engines_section(engines, machine_line),
        "### Where an edit's seconds go, and the whole job against its engine",
        "",
        *profile_section(profile, machine_line),
    ]


__all__ = ["edit_speed_section", "engines_section", "profile_section"]
