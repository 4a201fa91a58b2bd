"""Models and their inputs: loading any Hugging Face image-text-to-text family with its processor and the
embedded tiny Qwen2.5-VL (`loading`), encoding prompts and images (`inputs`), token constants and the prompt
(`tokens`), tiny local checkpoints of each family (`tiny_families`), LoRA (`lora`) and bf16 / gradient
checkpointing (`precision`).

May import: `common`, `config`, `store`, `data`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
