"""The transformers `Trainer` doing the training of a `toolkit finetune` recipe, for comparison.

python trainer_route.py RECIPE OUTPUT_DIR   # prints {"train_samples_per_second": ..., ...}

The same rows, tokenization and padding collator as `toolkit finetune` (its own data functions),
the same model, AdamW (fused), learning rate, warmup, weight decay, clipping, batch size, steps and
seed; no evaluation, no saving, no reporting. Timed like `toolkit finetune`: from the end of the
first update to the end of the last (callback timestamps), over the samples of the updates between.
"""

import contextlib
import json
import sys
import time

from transformers import (
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from toolkit.training.data import data_collator, load_text_data, tokenize_for_classification
from toolkit.training.models import training_tokenizer
from toolkit.training.recipe import load_recipe


class StepTimes(TrainerCallback):
    """perf_counter() at the end of every update (after the optimizer and scheduler step)."""

    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


config = load_recipe(sys.argv[1])
data = load_text_data(config)
tokenizer = training_tokenizer(config, data.train["text"], None)
train_set = tokenize_for_classification(data.train, tokenizer, config.max_length)
model = AutoModelForSequenceClassification.from_pretrained(config.model)
args = TrainingArguments(
    output_dir=sys.argv[2],
    max_steps=config.max_steps,
    per_device_train_batch_size=config.batch_size,
    learning_rate=config.learning_rate,
    weight_decay=config.weight_decay,
    warmup_steps=int(config.warmup_ratio * config.max_steps),  # as toolkit finetune counts it
    max_grad_norm=config.max_grad_norm,
    optim="adamw_torch_fused",
    seed=config.seed,
    logging_steps=config.log_every,
    eval_strategy="no",
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    dataloader_num_workers=0,
)
timer = StepTimes()
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=train_set,
    data_collator=data_collator(config.task, tokenizer),
    callbacks=[timer],
)
with contextlib.redirect_stdout(sys.stderr):  # its log lines; stdout holds the result alone
    trainer.train()
seconds = timer.times[-1] - timer.times[0]  # updates 2..N
samples = (len(timer.times) - 1) * config.batch_size
json.dump({"steps": len(timer.times), "train_samples_per_second": samples / seconds}, sys.stdout)
