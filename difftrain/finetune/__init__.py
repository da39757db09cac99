"""Fine-tuning as model changes (config key ``adapt``): the seam (``adapt.py``, ``change.py``) and LoRA via peft
(``lora.py``); adapters, ControlNet and QAT plug in as further changes."""
