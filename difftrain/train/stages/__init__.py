"""Stage registry: config ``stage`` -> Stage class (all run on the same Trainer)."""
from difftrain.train.stages.pretrain import PretrainStage

STAGES = {PretrainStage.name: PretrainStage}
