"""The testbed: a small deterministic world (char tokenizer, synthetic tasks, tiny Qwen2 models)
in which the paper's failure modes can be reproduced on a CPU in minutes."""
