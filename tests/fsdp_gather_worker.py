"""Run under torchrun (2 processes): shard a saved model with FSDP2, write each rank's local part
of one weight and the gathered whole state dict, for tests/test_finetune_multiprocess.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_gather_worker.py MODEL OUT NAME
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

from toolkit.training.sharding import full_state_dict, shard_on_cpu


def main(model_dir: str, out: str, name: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank, out = accelerator.process_index, Path(out)
    model = shard_on_cpu(AutoModelForSequenceClassification.from_pretrained(model_dir))
    local = model.get_parameter(name).to_local()  # this rank's rows of the DTensor
    save_file({name: local.detach().contiguous()}, str(out / f"local_{rank}.safetensors"))
    whole = full_state_dict(accelerator, model)  # every rank enters the gather
    (out / f"keys_{rank}.json").write_text(json.dumps(sorted(whole)))
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in whole.items()}, str(out / "whole.safetensors"))
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
