"""TransformerLens, the tool researchers use: boot the model, take its stacked W_Q.. tensors.

python transformerlens_route.py MODEL_DIR [OUT_FILE]
"""

import json
import sys

import torch
from safetensors.torch import save_file
from transformer_lens.model_bridge import TransformerBridge

bridge = TransformerBridge.boot_transformers(sys.argv[1], device="cpu")
with torch.no_grad():
    stacked = {"wq": bridge.W_Q, "wk": bridge.W_K, "wv": bridge.W_V, "w0": bridge.W_O}
    norms = {name: torch.linalg.norm(w, dim=(-2, -1)).tolist() for name, w in stacked.items()}
if len(sys.argv) > 2:
    save_file({name: w.contiguous() for name, w in stacked.items()}, sys.argv[2])
json.dump({"layers": len(norms["wq"])}, sys.stdout)
