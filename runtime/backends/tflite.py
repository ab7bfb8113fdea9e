"""TFLite / LiteRT backend: not built yet (no .tflite export ships; see docs/compiler.md)."""

from __future__ import annotations

from . import Backend, has_module


class TfliteBackend(Backend):
    name = "tflite"

    @classmethod
    def available(cls, bundle=None) -> str | None:
        if not (has_module("ai_edge_litert") or has_module("tflite_runtime")):
            return "neither ai-edge-litert nor tflite-runtime is installed"
        if bundle is not None and "tflite" not in bundle.manifest.get("exports", {}):
            return "the bundle holds no TFLite export (edgecl cannot write .tflite files yet)"
        return None


BACKEND = TfliteBackend
