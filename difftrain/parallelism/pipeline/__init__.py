"""Pipeline parallelism (DiffusionPipe): segments cut from backbones and the schedules that run them
(docs/PIPELINE.md)."""
