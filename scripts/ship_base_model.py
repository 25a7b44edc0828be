"""Copy the final weights of a `train-minimal sft --preset base` run into the package, as the
embedded base model (`tiny-base`, docs/models.md), with a record of how they were made.

    python scripts/ship_base_model.py runs/base
"""

from __future__ import annotations

import json
import shutil
import sys

from diagnose.rundir import RunReader
from diagnose.model.build import BASE_WEIGHTS_DIR, ensure_default_model, sha256_file


def main(run_dir: str) -> None:
    reader = RunReader(run_dir)
    step, ckpt = reader.checkpoints()[-1]
    info = reader.info
    tok = ensure_default_model() / "tokenizer.json"
    # save_pretrained re-serialises tokenizer.json, so compare what it encodes, not its bytes
    from tokenizers import Tokenizer

    a, b = Tokenizer.from_file(str(ckpt / "tokenizer.json")), Tokenizer.from_file(str(tok))
    probe = "Send 45 dollars from Dave to Frank <tool_call>\n{\"name\": \"f\"}</tool_call><|im_end|>"
    if a.get_vocab() != b.get_vocab() or a.encode(probe).ids != b.encode(probe).ids:
        sys.exit(f"{ckpt}: trained with another tokenizer than the one built here; not shipped")
    metrics = reader.metrics()
    evals = metrics.filter(metrics["step"] == metrics["step"].max()).select(
        [c for c in metrics.columns if c.startswith("eval/") or c == "sft_loss"]).to_dicts()
    BASE_WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ckpt / "model.safetensors", BASE_WEIGHTS_DIR / "model.safetensors")
    meta = {
        "made_by": "train-minimal sft --preset base",
        "step": step,
        "config": info.get("config"),
        "final_metrics": evals[0] if evals else {},
        "tokenizer_sha256": sha256_file(tok),
        "weights_sha256": sha256_file(BASE_WEIGHTS_DIR / "model.safetensors"),
    }
    (BASE_WEIGHTS_DIR / "base.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    print(f"shipped step {step} of {run_dir} to {BASE_WEIGHTS_DIR}")


if __name__ == "__main__":
    main(sys.argv[1])
