"""The keyed memory layout (the default): per-edit random columns of bounded residual blocks, routed by subject.

:mod:`~wise.keyed.table` (routing and the residual, shared with the vLLM replicas), :mod:`~wise.keyed.router`
(the edited projection at inference), :mod:`~wise.keyed.trainer` (writing edits), :mod:`~wise.keyed.bank`
(blocks, merging, supersede and retract), :mod:`~wise.keyed.editor` (all of it in one process).
"""
