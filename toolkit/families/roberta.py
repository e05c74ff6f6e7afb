"""RoBERTa: BERT's attention layout and names (`roberta.` prefix in task models). Its own
family: a roberta-base and a bert-base of equal sizes are unrelated bases, so compare sets them
side by side structurally instead of subtracting their weights."""

from __future__ import annotations

import dataclasses

from toolkit.families import bert

FAMILY = dataclasses.replace(bert.FAMILY, name="roberta", model_types=("roberta",))
