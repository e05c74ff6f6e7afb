"""Tiny real models of unusual shapes, built from configs and saved with save_pretrained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

BERT_SHAPE = {
    "hidden_size": 48,
    "num_attention_heads": 3,
    "num_hidden_layers": 2,
    "intermediate_size": 40,
    "vocab_size": 120,
    "max_position_embeddings": 64,
}
GPT2_SHAPE = {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 120, "n_positions": 64}


def _save(model, folder):
    import torch

    torch.manual_seed(0)
    # The default init (std 0.02, zero biases) gives nearly uniform attention and no bias
    # signal; larger weights make a wrong head, scale or bias show up clearly.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
            elif parameter.dim() >= 2:
                parameter.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """BertModel: 2 layers, 3 heads, d_model 48 (d_head 16)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    return _save(BertModel(BertConfig(**BERT_SHAPE)), tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_classifier(tmp_path_factory):
    """BertForSequenceClassification: tensor names carry the 'bert.' prefix."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(2)
    model = BertForSequenceClassification(BertConfig(**BERT_SHAPE, num_labels=3))
    return _save(model, tmp_path_factory.mktemp("tiny_bert_cls"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """GPT2Model: 2 layers, 4 heads, d_model 64 (d_head 16)."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(3)
    return _save(GPT2Model(GPT2Config(**GPT2_SHAPE)), tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_gpt2_lm_scaled(tmp_path_factory):
    """GPT2LMHeadModel ('transformer.' prefix) with scaling by 1/(layer+1), 3 layers."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    config = GPT2Config(**{**GPT2_SHAPE, "n_layer": 3}, scale_attn_by_inverse_layer_idx=True)
    return _save(GPT2LMHeadModel(config), tmp_path_factory.mktemp("tiny_gpt2_lm"))


@pytest.fixture(scope="session")
def tiny_gpt2_unscaled(tmp_path_factory):
    """GPT2Model with scale_attn_weights=False (no 1/sqrt(d_head))."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(5)
    config = GPT2Config(**{**GPT2_SHAPE, "n_embd": 24, "n_head": 2}, scale_attn_weights=False)
    return _save(GPT2Model(config), tmp_path_factory.mktemp("tiny_gpt2_unscaled"))


# --- modern families: grouped-query attention, rotary positions, optional biases -------------
# Odd shapes throughout: head counts that are not powers of two, h / h_kv = 3 or 5, d_head != 64,
# and h * d_head != d_model where the config allows an explicit head_dim.
LLAMA_SHAPE = {
    "hidden_size": 48,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,  # groups of 3
    "head_dim": 10,  # h * d_head = 60 != d_model
    "num_hidden_layers": 2,
    "intermediate_size": 40,
    "vocab_size": 120,
    "max_position_embeddings": 64,
}


def _modern(config_class, model_class, seed, folder, **settings):
    import torch

    torch.manual_seed(seed)
    return _save(model_class(config_class(**settings)), folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """LlamaModel: 6 query / 2 key-value heads, d_head 10, llama3 rope scaling, no biases."""
    from transformers import LlamaConfig, LlamaModel

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 2.0,
        "original_max_position_embeddings": 8,
    }
    return _modern(
        LlamaConfig,
        LlamaModel,
        11,
        tmp_path_factory.mktemp("tiny_llama"),
        **LLAMA_SHAPE,
        rope_parameters=rope,
    )


@pytest.fixture(scope="session")
def tiny_llama_biased(tmp_path_factory):
    """LlamaForCausalLM ('model.' prefix) with attention_bias=True and linear rope scaling,
    5 query / 5 key-value heads (multi-head attention in the Llama layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**LLAMA_SHAPE, "hidden_size": 45, "num_attention_heads": 5, "num_key_value_heads": 5}
    shape["head_dim"] = 6
    rope = {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}
    return _modern(
        LlamaConfig,
        LlamaForCausalLM,
        12,
        tmp_path_factory.mktemp("tiny_llama_biased"),
        **shape,
        attention_bias=True,
        rope_parameters=rope,
    )


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    """MistralModel: 10 query / 2 key-value heads (groups of 5), d_head 6, sliding window 3."""
    from transformers import MistralConfig, MistralModel

    shape = {**LLAMA_SHAPE, "hidden_size": 40, "num_attention_heads": 10, "head_dim": 6}
    return _modern(
        MistralConfig,
        MistralModel,
        13,
        tmp_path_factory.mktemp("tiny_mistral"),
        **shape,
        sliding_window=3,
    )


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """Qwen2Model: 9 query / 3 key-value heads, d_head 6, q/k/v biases, yarn rope scaling, and a
    sliding window of 4 on layer 1 only (max_window_layers 1)."""
    from transformers import Qwen2Config, Qwen2Model

    shape = {**LLAMA_SHAPE, "hidden_size": 54, "num_attention_heads": 9, "num_key_value_heads": 3}
    shape.pop("head_dim")
    rope = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 2.0,
        "original_max_position_embeddings": 8,
    }
    return _modern(
        Qwen2Config,
        Qwen2Model,
        14,
        tmp_path_factory.mktemp("tiny_qwen2"),
        **shape,
        rope_parameters=rope,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory):
    """RobertaModel: 2 layers, 5 heads, d_model 30 (d_head 6)."""
    from transformers import RobertaConfig, RobertaModel

    shape = {**BERT_SHAPE, "hidden_size": 30, "num_attention_heads": 5}
    return _modern(
        RobertaConfig, RobertaModel, 15, tmp_path_factory.mktemp("tiny_roberta"), **shape
    )


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory):
    """DistilBertModel: 2 layers, 7 heads, d_model 42 (d_head 6)."""
    from transformers import DistilBertConfig, DistilBertModel

    shape = {"dim": 42, "n_heads": 7, "n_layers": 2, "hidden_dim": 40, "vocab_size": 120}
    return _modern(
        DistilBertConfig,
        DistilBertModel,
        16,
        tmp_path_factory.mktemp("tiny_distilbert"),
        **shape,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="session")
def minilm():
    from toolkit.sources import embedded_model_path

    return embedded_model_path()


# --- fine-tuning: a learnable toy task, a toy corpus, and a tiny BERT with a real tokenizer ---

POSITIVE = ["great", "good", "fine", "love", "nice", "superb"]
NEGATIVE = ["bad", "awful", "hate", "poor", "sad", "dull"]
FILLER = ["the", "a", "movie", "film", "was", "is", "it", "plot", "very", "and"]
TINY_GPT2_SPEC = "gpt2-config:n_layer=2,n_head=2,n_embd=32,vocab_size=300"
# The command-line options both fault tests give a tiny GPT-2 language-model run.
TINY_GPT2_LM_OPTIONS = [
    *("--model", TINY_GPT2_SPEC, "--task", "causal-lm"),
    *("--max-length", "32", "--batch-size", "4"),
]


@pytest.fixture(scope="session")
def toy_sentiment_csv(tmp_path_factory):
    """240 reviews: four filler words and one word that decides the label (positive/negative)."""
    import csv
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("toy_data") / "reviews.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "review", "sentiment"])
        for i in range(240):
            label = "positive" if i % 2 else "negative"
            words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if i % 2 else NEGATIVE)]
            rng.shuffle(words)
            writer.writerow([i, " ".join(words), label])
    return path


@pytest.fixture(scope="session")
def toy_corpus_txt(tmp_path_factory):
    """400 short lines of a small repetitive English for causal language modelling."""
    import random

    rng = random.Random(1)
    subjects = ["the cat", "a dog", "my friend", "the bird"]
    verbs, objects = ["sees", "likes", "finds"], ["the ball", "a tree", "the house"]
    lines = [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(400)
    ]
    path = tmp_path_factory.mktemp("toy_corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_bert_with_tokenizer(tmp_path_factory):
    """BertModel (2 layers, 3 heads, d_model 48) with a word-level tokenizer of the toy words."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(6)
    folder = tmp_path_factory.mktemp("tiny_bert_tok")
    BertModel(BertConfig(**BERT_SHAPE)).save_pretrained(folder)
    _save_toy_tokenizer(folder)
    return folder


def _save_toy_tokenizer(folder) -> None:
    """A word-level BERT tokenizer of the toy reviews' words."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread: two oversubscribe a busy 2-core machine (seen
    here: a 384 x 384 float64 SVD 5x slower with two threads while another job ran)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert_scaled_with_tokenizer(tmp_path_factory):
    """The tokenizer model's shapes with weights of std 0.2 (biases 0.5), ten times the config's
    initializer_range: a stand-in "pretrained" checkpoint that no fresh initialisation matches."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(7)
    folder = _save(BertModel(BertConfig(**BERT_SHAPE)), tmp_path_factory.mktemp("tiny_bert_scaled"))
    _save_toy_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_lm_with_tokenizer(toy_corpus_txt, tmp_path_factory):
    """GPT2LMHeadModel (2 layers, 2 heads, d_model 32) with a BPE tokenizer of the toy corpus."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from toolkit.training.data import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(toy_corpus_txt.read_text().splitlines(), 300)
    torch.manual_seed(8)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer))
    folder = _save(GPT2LMHeadModel(config), tmp_path_factory.mktemp("tiny_gpt2_tok"))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for the page tests (tests/chromium.py); skipped, with how to install
    one, when there is none."""
    from chromium import INSTALL_HINT, Browser, find_browser

    executable = find_browser()
    if executable is None:
        pytest.skip(f"no Chromium-family browser found: {INSTALL_HINT}")
    browser = Browser(executable)
    yield browser
    browser.close()


def tiny_classification_run(csv, model, out, report: bool = False, **settings):
    """`toolkit.finetune` (with `report`: `finetune_with_report`) of a tiny classifier on a toy
    CSV: 16 tokens, batches of 16, a learning rate that moves tiny weights in a few steps
    (`settings` may override these)."""
    import toolkit
    from toolkit.training.recipe import FinetuneConfig

    defaults = {"max_length": 16, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0}
    config = FinetuneConfig(
        model=str(model), dataset=str(csv), output_dir=str(out), **{**defaults, **settings}
    )
    return (toolkit.finetune_with_report if report else toolkit.finetune)(config)


def assert_rejected_before_torch(argv: list[str], message: str) -> None:
    """`toolkit ARGV` exits 1 with one error line starting `error: MESSAGE`, and neither torch
    nor transformers is imported on the way (a bad value is rejected in a fraction of a second)."""
    code = (
        "import sys\n"
        "from toolkit.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=300,
    )
    assert out.stdout.split() == ["1", "False", "False"], out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: {message}")
