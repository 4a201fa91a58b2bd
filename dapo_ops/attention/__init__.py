"""Where generated tokens look: the stage metrics and the eager oracle (`metrics`), the lean O(T) modality-mass
recorder (`recorder`), one forward over prompt + completion (`forward`), the shared-prefix forward
(`shared_prefix`), the round's teacher-forced pass (`teacher_forced`) and the attention reward's pathwise term
(`pathwise`).

May import: `common`, `config`, `store`, `data`, `models`, `rl`, `rollout`.
"""

from dapo_ops import _lazy

__getattr__ = _lazy.searching(__name__, __path__)
