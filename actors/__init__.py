"""Thin Ray shells over ``wise``: the editor actor (trains side-memory shards on one model replica) and the
evaluator actor (measures retention of a published state). The classes are plain Python; the orchestrator
wraps them with ``ray.remote`` and its resource settings, so they can also be used (and tested) in-process."""
