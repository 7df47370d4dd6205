"""Worker extension for hot publishing into running vLLM engines (``worker_extension_cls``).

vLLM mixes this class into each worker; the serving replica calls its methods by name through the engine
handle it owns (``engine.collective_rpc("wise_publish", args=(package,))``), never over HTTP. A publish moves
a :func:`wise.publish.encode_package` byte string (the memories the replica lacks plus all thresholds) and
changes the routed projection's buffers in place between two engine steps, so requests keep flowing.
"""

from __future__ import annotations

import logging

from wise.publish import PublishError, decode_package

logger = logging.getLogger(__name__)


class WiseWorkerExtension:
    """Methods vLLM adds to its worker class (``self`` is the worker)."""

    def _wise_modules(self) -> list:
        from serving.vllm_model import WiseRoutedProjection

        model = self.model_runner.model
        mods = [m for m in model.modules() if isinstance(m, WiseRoutedProjection)]
        if not mods:
            raise PublishError("this engine's model has no WISE-routed projection (architecture not Wise*)")
        return mods

    def wise_publish(self, package: bytes) -> dict:
        """Install a published version. Returns the worker's :meth:`wise_info` afterwards.

        Raises:
            PublishError: malformed package, or a memory this worker does not hold and was not sent.
        """
        header, tensors = decode_package(package)
        new = {mid: tensors[f"delta.{mid}"] for mid in header["sent"]}
        routing = {k.removeprefix("routing."): v for k, v in tensors.items() if k.startswith("routing.")}
        for mod in self._wise_modules():
            if mod.layout != header["layout"]:
                raise PublishError(
                    f"package is layout {header['layout']!r}, the engine serves {mod.layout!r}"
                )
            if mod.layout == "shards" and mod.reduce != header["reduce"]:
                raise PublishError(f"package routes by {header['reduce']!r}, the engine by {mod.reduce!r}")
            try:
                if mod.layout == "keyed":
                    mod.install_keyed(
                        header["ids"],
                        new,
                        routing,
                        header["max_len"],
                        header["min_similarity"],
                        header["version"],
                        header["relation_key"],
                    )
                else:
                    mod.install(header["ids"], tensors["thresholds"], new, header["version"])
            except (KeyError, ValueError) as err:
                raise PublishError(str(err)) from err
        logger.info(
            "serving WISE version %d: %d memories (%d received), %d edits",
            header["version"],
            len(header["ids"]),
            len(new),
            header["n_edits"],
        )
        return self.wise_info()

    def wise_info(self) -> dict:
        """Version served, live memory ids and the routed layer's settings."""
        mod = self._wise_modules()[0]
        return {
            "version": mod.version,
            "ids": list(mod.ids),
            "count": mod.count,
            "reduce": mod.reduce,
            "layout": mod.layout,
        }

    def wise_set_routing(self, enabled: bool) -> bool:
        """Turn routing off (main memory only, the pre-edit model) or on; for benchmarks."""
        for mod in self._wise_modules():
            mod.routing = bool(enabled)
        return bool(enabled)
