"""Teacher traces: Ray Data + vLLM generation, the content-addressed Parquet store, and trace scoring.

`generate_traces(spec, problems, tokenizer_dir, teacher_dir, out_root) -> TraceSet` is the entry point; see
raykd.traces.pipeline. Importing this package loads no torch or vLLM (they load inside the engine actors).
"""

from raykd.traces.pipeline import TraceSet, generate_traces

__all__ = ["TraceSet", "generate_traces"]
