"""Training: pretrain, finetune, LoRA, prefix tuning, data-parallel workers, resume, merge."""
