"""Pipeline parallelism (DiffusionPipe): stages cut from backbones and the schedules that run them (docs/PIPELINE.md)."""
