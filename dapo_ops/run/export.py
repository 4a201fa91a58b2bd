"""`make export`: a checkpoint as a standalone model directory that transformers loads directly
(`AutoModelForImageTextToText.from_pretrained(out)`): weights, tokenizer, image processor, chat template;
no optimizer state, state.json or run markers.

A full checkpoint is copied as it is. A LoRA checkpoint is written merged (base + adapter in one set of
weights) with `merge`, else as the adapter directory (adapter + processor, `base_model_name_or_path`
pointing at the base model directory, which transformers then loads with peft).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dapo_ops.models import loading as models
from dapo_ops.models import lora
from dapo_ops.run import retention
from dapo_ops.store import layout as store
from dapo_ops.store.layout import RunStore

RUN_ONLY_FILES = frozenset({store.STATE_FILE, store.OPTIMIZER_FILE, store.COMPLETE_MARKER, retention.PRUNED_MARKER})


def export_checkpoint(run_store: RunStore, key: str, out: str | Path, *, merge: bool = False) -> Path:
    """Write checkpoint `key` of the run to `out` (atomically); returns `out`."""

    path = run_store.require_checkpoint(key)
    retention.require_weights(run_store, key)
    out = Path(out).resolve()
    model_dir = store.resolve_model_dir(run_store, key)
    with store.atomic_directory(out, marker=None) as tmp:
        if lora.is_adapter_dir(path) and merge:
            base = models.load_policy(model_dir)
            base.model = lora.merge_adapter_dir(base.model, path)
            models.write_policy(base, tmp)
        elif lora.is_adapter_dir(path):
            _copy_files(path, tmp)
            adapter_config = tmp / lora.ADAPTER_CONFIG
            values = json.loads(adapter_config.read_text(encoding="utf-8"))
            values["base_model_name_or_path"] = str(model_dir)
            adapter_config.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
        else:
            _copy_files(model_dir, tmp)
    return out


def _copy_files(source: Path, target: Path) -> None:
    for item in sorted(Path(source).iterdir()):
        if item.is_file() and item.name not in RUN_ONLY_FILES and not item.name.startswith("."):
            shutil.copy2(item, target / item.name)


def default_out(run_store: RunStore, key: str, *, merge: bool) -> Path:
    return run_store.run_dir / "export" / f"{key}{'-merged' if merge else ''}"
