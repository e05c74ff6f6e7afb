"""A fine-tune with bad data or settings stops before it writes anything, with a plain message."""

from __future__ import annotations

import pytest

import toolkit
from toolkit.errors import ToolkitError
from toolkit.training.recipe import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(data, model, out, **settings):
    config = FinetuneConfig(
        model=str(model), dataset=str(data), output_dir=str(out), max_steps=1, **settings
    )
    return toolkit.finetune(config)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty \\(0 bytes\\)"),
        (b"\n  \n", "holds only blank lines"),
        (b"review,sentiment\n", "holds no rows"),
        (b"review,sentiment\ncaf\xe9 good,positive\n", "is not utf-8 text \\(byte 0xe9 at offset"),
        (b"review,sentiment\n,positive\n  ,negative\n", "no usable training rows"),
    ],
    ids=["empty", "blank", "header-only", "latin-1", "no-text-in-any-row"],
)
def test_bad_file_gets_its_own_message_and_no_output_folder(
    content, message, tiny_bert_with_tokenizer, tmp_path
):
    data = tmp_path / "data.csv"
    data.write_bytes(content)
    with pytest.raises(ToolkitError, match=message):
        _run(data, tiny_bert_with_tokenizer, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_label_column_leaves_an_existing_folder_untouched(
    tiny_bert_with_tokenizer, tmp_path
):
    data = tmp_path / "texts.csv"
    data.write_text("id,review\n1,good film\n2,bad film\n3,fine film\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ToolkitError, match="which column of .* holds the labels"):
        _run(data, tiny_bert_with_tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_model_typo_stops_before_the_output_folder(toy_sentiment_csv, tmp_path):
    with pytest.raises(ToolkitError, match="did you mean 'minilm'"):
        _run(toy_sentiment_csv, "minilmm", tmp_path / "run")
    assert not (tmp_path / "run").exists()
