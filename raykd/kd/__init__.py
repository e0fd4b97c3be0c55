"""KD training, one trial: trace rows -> examples -> micro-batches -> DeepSpeed steps on Ray Train workers.

Pure math (no Ray, DeepSpeed or vLLM): `divergences`, `teachers` (teacher signals, top-k buckets), `losses`
(chunked CE + KD), `examples` (truncation and masks per trace), `batching` (epoch plans, padding).
Torch and DeepSpeed: `model` (student/teacher wrappers, loading, FLOPs), `deepspeed_config`, `step` (one
optimizer step), `memory`. Ray Train: `trainer` (the TorchTrainer), `worker` (the training loop), `metrics`,
`checkpoint`, `export` (the Hugging Face student). `synthetic`: tiny traces and models for tests.

Import-light on purpose: importing `raykd.kd` loads no torch; import the module you need where you need it.
"""
