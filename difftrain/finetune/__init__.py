"""Fine-tuning stages (LoRA via peft, adapters, ControlNet, QAT via torchao) plug in here as Stages."""
