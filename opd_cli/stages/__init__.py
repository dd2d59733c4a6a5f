"""Training stages, one readable file each: sft.py (supervised fine-tuning, also the testbed's
pretraining), rlvr.py (GRPO with a verifiable reward), evaluate.py."""
