"""Every Python example in README.md runs as written, in a fresh folder."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.fixture
def fine_tuned_minilm(tmp_path):
    """./my-finetuned-minilm, as the README assumes: MiniLM with its attention weights moved."""
    import torch
    from transformers import AutoModel

    from toolkit.sources import embedded_model_path

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(embedded_model_path())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".attention." in name:
                parameter.add_(0.01 * parameter.std() * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "my-finetuned-minilm")


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread", "fine_tuned_minilm")
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs_and_its_shape_comments_hold(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    # `expr  # (12, 384, 32)`: a tuple in the comment is what the expression gives
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        claim = comment.split(":")[0].strip()
        if claim.startswith("(") and "=" not in code:
            assert eval(code, namespace) == ast.literal_eval(claim), line
