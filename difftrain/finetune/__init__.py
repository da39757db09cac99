"""Fine-tuning as model changes (config key ``adapt``): the seam (``adapt.py``, ``change.py``), LoRA via peft
(``lora.py``) and DiffFit's bias and scale tuning for the DiT (``difffit.py``); adapters, ControlNet and QAT plug in
as further changes."""
