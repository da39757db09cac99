"""Distillation tools that run outside the trainer (the teacher-based training stages live in train/stages/)."""
