"""The model's own forward pass, the floor under `toolkit verify`: load it as verify does
(AutoModel, eager attention, float32) and run it once on verify's inputs.

python forward_route.py MODEL_DIR
"""

import sys

import torch

from toolkit.attention import load_attention
from toolkit.runtime import load_model, make_inputs

attention = load_attention(sys.argv[1])
net = load_model(attention)
input_ids, padding, _ = make_inputs(attention, None, 0)
with torch.no_grad():
    net(input_ids=input_ids, attention_mask=padding, output_attentions=True)
