"""The route people take today: build the whole model, then slice the attention weights per head.

python automodel_route.py MODEL_DIR            # per-head norms, as `toolkit inspect --json`
python automodel_route.py MODEL_DIR OUT_FILE   # also save the per-head tensors, as `extract`
"""

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModel

model = AutoModel.from_pretrained(sys.argv[1])
config = model.config
n_heads = config.num_attention_heads
n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
tensors, norms = {}, []
with torch.no_grad():
    if config.model_type == "llama":  # nn.Linear [out, in]; k and v have n_kv_heads heads
        blocks = [
            (a.q_proj.weight.T, a.k_proj.weight.T, a.v_proj.weight.T, a.o_proj.weight.T)
            for a in (layer.self_attn for layer in model.layers)
        ]
    elif config.model_type == "gpt2":  # Conv1D weights are stored [in, out]
        blocks = [
            (*b.attn.c_attn.weight.split(config.n_embd, dim=1), b.attn.c_proj.weight)
            for b in model.h
        ]
    elif config.model_type == "gpt_neox":  # query_key_value rows per head: [h, 3 (q, k, v), d_head]
        blocks = []
        for a in (layer.attention for layer in model.layers):
            qkv = a.query_key_value.weight.view(n_heads, 3, -1, config.hidden_size)
            q, k, v = (qkv[:, i].reshape(-1, config.hidden_size).T for i in range(3))
            blocks.append((q, k, v, a.dense.weight.T))
    else:  # nn.Linear weights are stored [out, in]
        blocks = [
            (
                a.self.query.weight.T,
                a.self.key.weight.T,
                a.self.value.weight.T,
                a.output.dense.weight.T,
            )
            for a in (layer.attention for layer in model.encoder.layer)
        ]
    for index, (q, k, v, o) in enumerate(blocks):
        d_model = q.shape[0]
        per_head = {
            name: m.reshape(d_model, heads, -1).permute(1, 0, 2)
            for name, m, heads in (("wq", q, n_heads), ("wk", k, n_kv_heads), ("wv", v, n_kv_heads))
        }
        per_head["w0"] = o.reshape(n_heads, -1, o.shape[1])
        norms.append(
            {name: torch.linalg.norm(w, dim=(1, 2)).tolist() for name, w in per_head.items()}
        )
        tensors.update({f"layers.{index}.{name}": w.contiguous() for name, w in per_head.items()})
if len(sys.argv) > 2:
    save_file(tensors, sys.argv[2])
json.dump({"layers": norms}, sys.stdout)
