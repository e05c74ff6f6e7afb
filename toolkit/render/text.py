# ruff: noqa: E501  (prose: sentences are kept whole rather than wrapped at 100 columns)
"""The canned prose of the lessons, in English and Chinese, with placeholders for the numbers.

Every number in the prose is a `{placeholder}` filled at render time from a lesson's result; the
two languages use the same keys and the same placeholders.
"""

from __future__ import annotations

import locale
import os

LANGUAGES = ("en", "zh")

TEXT: dict[str, dict[str, str]] = {
    "en": {
        # shared
        "model_line": "Model {model} (family {family}).",
        "figure": "Figure",
        "layer": "layer",
        "head": "head",
        "role": "matrix",
        "not_applicable": "Skipped: {reason}.",
        "skip.softmax_alibi": "the softmax lesson does not apply to {family} models: their scores add ALiBi position biases to q . k * scale (verify checks them)",
        "skip.softmax_relative_bias": "the softmax lesson does not apply to {family} models: their scores add a learned relative-position bias to q . k * scale (verify checks them)",
        "skip.softmax_cap": "the softmax lesson does not apply to {family} models: their scores soft-cap q . k * scale (verify checks them)",
        "skip.qkv_narrow": "the qkv lesson does not apply to this {family} model: its loss scores the {d_model}-wide hidden states against the token embeddings (tied weights), which are {width} wide here",
        # w0
        "w0.title": "Question 1: why one W0, and not one output matrix per head?",
        "w0.shapes": (
            "In layer {layer}, each of the {n_heads} heads outputs z_i of shape {z_shape} "
            "(tokens x d_head, for the {tokens} tokens of the first input). Side by side they form "
            "Concat(z) {concat_shape}; W0 is {w0_shape} and maps it to the block output {output_shape}."
        ),
        "w0.identity": (
            "Rows {d_head}*i to {d_head}*(i+1)-1 of W0 belong to head i: call them w0[i] "
            "[{d_head}, {d_model}]. So Concat(z) @ W0 = sum_i z_i @ w0[i]. On these inputs the two "
            "routes differ by at most {concat_diff:.1e}, and the sum (+ b0) equals the model's own "
            "attention output to {model_diff:.1e}."
        ),
        "w0.why_one": (
            "So W0 is one matrix whose row blocks belong to the heads: through its block each head "
            "writes into all {d_model} output dimensions, and the sum mixes what the heads found. "
            "There is no 'W1..W{n_heads}' for the output because the per-head matrices already exist: "
            "they are the slices of Wq, Wk, Wv (and the blocks w0[i] of W0)."
        ),
        "w0.square": (
            "A common claim is that W0 'reduces the dimension'. Not here: h*d_head = {n_heads}*{d_head} "
            "= {width} = d_model, so W0 is square {w0_shape} and the model would lose nothing in size "
            "without it. Its numerical rank is {rank} of {width} (singular values from {smax:.3g} "
            "down to {smin:.3g})."
        ),
        "w0.reduces": (
            "Here h*d_head = {n_heads}*{d_head} = {width} is larger than d_model = {d_model}: W0 does "
            "reduce the dimension, from {width} to {d_model}. Its numerical rank is {rank}."
        ),
        "w0.expands": (
            "Here h*d_head = {n_heads}*{d_head} = {width} is smaller than d_model = {d_model}: W0 "
            "widens the concatenation to d_model. Its numerical rank is {rank}."
        ),
        "w0.experiment": (
            "What W0 does, measured: layer {layer}'s W0 is replaced (b0 kept) and the real model "
            "runs on {n_inputs} inputs. The table gives the relative change ||new - old|| / ||old|| "
            "of that layer's attention output and of the model's final hidden states. (Putting the "
            "original W0 back through the same route changes the final states by {reinserted:.1e}.) "
            "The identity passes Concat(z) on unmixed: head i's output lands in its own {d_head} "
            "dimensions only. 'w0[j] for every head' is W0 built from head j's block repeated "
            "{n_heads} times, {w0_shape}, which computes (sum_i z_i) @ w0[j]: all heads written "
            "through one head's map."
        ),
        "w0.no_identity": "The identity is not tried: W0 {w0_shape} is not square.",
        "w0.identity_row": "identity",
        "w0.repeat_row": "w0[{head}] for every head",
        "w0.replacement": "W0 replaced by",
        "w0.layer_change": "layer output change",
        "w0.final_change": "final output change",
        "w0.summary": (
            "Across these substitutes the layer's attention output changes by {min_layer:.0%} to "
            "{max_layer:.0%} and the model's final output by {min_final:.0%} to {max_final:.0%}: "
            "that is how much of the model depends on the mixing this one layer's W0 learned."
        ),
        "w0.figure": "Mean |W0| of each head's row block (rows: heads, columns: output dimensions)",
        # softmax
        "softmax.title": "Question 2: softmax, step by step (layer {layer}, head {head})",
        "softmax.intro": (
            "Query token {query} '{query_token}' of \"{text}\" may attend to {n_keys} tokens. "
            "Each score is q . k_j (vectors of length d_head = {d_head}) times the model's scale "
            "{scale:.4g} (1/sqrt(d_head) = {inv_sqrt:.4g})."
        ),
        "softmax.key": "key",
        "softmax.token": "token",
        "softmax.raw": "q.k",
        "softmax.scaled": "x scale",
        "softmax.shifted": "- max",
        "softmax.exp": "exp",
        "softmax.prob": "/ sum",
        "softmax.model": "model",
        "softmax.steps": (
            "The largest score is {largest:.4f}. After subtracting it every exponent is <= 0, so "
            "every exp lies in (0, 1]; their sum is {exp_sum:.4f}, and dividing by it gives "
            "probabilities that add up to 1."
        ),
        "softmax.check": (
            "The model's own attention row (output_attentions) differs from this by at most {diff:.1e}."
        ),
        "softmax.overflow": (
            "Why subtract the largest score: exp(x) is infinite above x = {f16:.2f} in float16 and "
            "{f32:.2f} in float32. Adding the same constant to every score leaves softmax unchanged "
            "(each exp is multiplied by the same factor), so the table shifts these scores until the "
            "largest passes each limit, and computes both formulas in both precisions:"
        ),
        "softmax.largest": "largest score",
        "softmax.dtype": "precision",
        "softmax.naive_nonfinite": "naive: inf/NaN probabilities",
        "softmax.naive_error": "naive: max error",
        "softmax.stable_error": "stable: max error",
        "softmax.broken": "broken",
        "softmax.overflow_summary": (
            "The naive exp(s) / sum exp(s) broke (inf or NaN) in {broken} of {cases} cases; "
            "exp(s - max) / sum exp(s - max) stayed finite in {stable_ok} of {cases}."
        ),
        "softmax.race": (
            "The race: the tokens are runners and the scores are how far each ran. Only the distance "
            "behind the leader counts (that is the subtraction). '{leader}' leads with {leader_score:.2f} "
            "and takes {leader_prob:.1%} of the attention. '{second}' is {gap:.2f} behind, so it gets "
            "e^-{gap:.2f} = {ratio:.3f} of the leader's share: {second_prob:.1%}. The last, '{last}', "
            "is {last_gap:.2f} behind and gets {last_prob:.2%}."
        ),
        "softmax.figure": "Attention of query '{query_token}' (layer {layer}, head {head})",
        # qkv
        "qkv.title": "Question 3: where Wq, Wk, Wv come from, and how they are adjusted",
        "qkv.init": (
            "Before training, {family} draws every entry of Wq, Wk, Wv from normal(0, {std}) "
            "(config initializer_range) and sets the biases to 0. A fresh model of this config "
            "(seed {seed}) has a mean std of {init_std:.4f}; the trained weights have {trained_std:.4f}."
        ),
        "qkv.init_unknown": (
            "The config gives no initializer_range; a fresh model of this config (seed {seed}) has a "
            "mean std of {init_std:.4f}; the trained weights have {trained_std:.4f}."
        ),
        "qkv.std_init": "std init",
        "qkv.std_trained": "std trained",
        "qkv.sv_init": "σ max init",
        "qkv.sv_trained": "σ max trained",
        "qkv.sv_median_init": "σ median init",
        "qkv.sv_median_trained": "σ median trained",
        "qkv.spectra_steeper": (
            "Singular values: the fresh random matrices have largest / median = "
            "{init_ratio:.1f} on average, the trained ones {trained_ratio:.1f}: training has "
            "concentrated the weights in fewer directions."
        ),
        "qkv.spectra_flatter": (
            "Singular values: the fresh random matrices have largest / median = "
            "{init_ratio:.1f} on average, the trained ones {trained_ratio:.1f}: training has not "
            "concentrated the weights in fewer directions."
        ),
        "qkv.loss_masked": (
            'One backpropagation step on "{text}". The loss is defined here so that it needs no '
            "task head ({model} is run as a base model): token {position} '{token}' is replaced by the mask token and "
            "predicted from the final hidden state, scored against the model's own input "
            "embeddings (tied weights); loss = cross-entropy = {loss:.4f}. Dropout is off."
        ),
        "qkv.loss_next": (
            'One backpropagation step on "{text}". The loss: each next token predicted from the '
            "final hidden state, scored against the model's own input embeddings (tied weights); "
            "loss = mean cross-entropy = {loss:.4f}. Dropout is off."
        ),
        "w0.shared_kv": (
            "This model uses grouped-query attention: its {n_heads} query heads share {n_kv_heads} key/value heads, "
            "{group} query heads to each (query head i reads key/value head i // {group}). Heads of one group "
            "weigh the same values v with their own attention patterns, so their z_i differ; W0 still has one "
            "block w0[i] per query head, and Concat(z) is still {n_heads} x d_head wide."
        ),
        "w0.shared_kv_one": (
            "This model uses multi-query attention: all {n_heads} query heads read one key/value head. They "
            "weigh the same values v with their own attention patterns, so their z_i differ; W0 still has one "
            "block w0[i] per query head, and Concat(z) is still {n_heads} x d_head wide."
        ),
        "qkv.shared_kv_one": (
            "Here wk and wv have a single head for {n_heads} query heads (multi-query attention): its gradient "
            "sums what all {n_heads} of them asked of it, and the per-head tables below have one row for wk and wv."
        ),
        "qkv.shared_kv": (
            "Here wk and wv have only {n_kv_heads} heads for {n_heads} query heads: each key/value head is shared "
            "by {group} query heads, so its gradient sums what all {group} of them asked of it, and its rows in "
            "the per-head tables below are key/value heads, not query heads."
        ),
        "qkv.grad_table": "Gradient norm ||dL/dW|| per layer",
        "qkv.grad_head_table": "Gradient norm of {role} per head (rows) and layer (columns)",
        "qkv.sgd": (
            "An SGD step with lr = {lr:g} sets W <- W - lr * dL/dW. Over all layers, "
            "max |delta W - (-lr * dL/dW)| = {diff:.1e} (float32 rounding); the step moves Wq, Wk, "
            "Wv by {min_rel:.3%} to {max_rel:.3%} of their norm, and the loss goes from {loss:.4f} "
            "to {loss_after:.4f}."
        ),
        "qkv.figure": "Singular values of Wq, Wk, Wv per layer: fresh initialisation (dashed) vs trained",
        # pretrained
        "pretrained.title": "Question 4: train Wq, Wk, Wv from scratch, or reuse pretrained ones?",
        "pretrained.setup": (
            "The same fine-tune runs twice on {model} ({task} on {dataset}): {steps} steps of "
            "{batch_size} examples (at most {train_samples} training rows, {max_length} tokens "
            "each), learning rate {lr:g}, seed {seed}, then an evaluation on at most "
            "{eval_samples} held-out rows. Run 1 starts from the pretrained weights; run 2 from "
            "a fresh initialisation of the same architecture, drawn by the model's own "
            "initializer with the same seed. Same data, same order, same optimiser: only the "
            "starting weights differ."
        ),
        "pretrained.quantity": "after {steps} steps",
        "pretrained.train_loss": "training loss (mean of the last {n} steps)",
        "pretrained.seconds": "seconds",
        "pretrained.run_pretrained": "pretrained start",
        "pretrained.run_random": "random start",
        "pretrained.metric_better": (
            "The pretrained start reached {metric} {pretrained:.4f}, the random start "
            "{random:.4f}: with the same data and steps, reusing the pretrained weights gave the "
            "better model."
        ),
        "pretrained.metric_worse": (
            "Here the random start reached the better {metric}: {random:.4f}, against "
            "{pretrained:.4f} from the pretrained weights."
        ),
        "pretrained.metric_equal": "Both runs reached the same {metric}, {pretrained:.4f}.",
        "pretrained.loss_line": (
            "Validation loss: {pretrained_loss:.4f} from the pretrained start, {random_loss:.4f} "
            "from the random start."
        ),
        "pretrained.change_table": "Relative change ||W_end - W_start|| / ||W_start|| by layer",
        "pretrained.start_norm": "||W_start|| {run}",
        "pretrained.moved_random_more": (
            "How far the weights moved: averaged over the layers and Wq/Wk/Wv/W0, the random "
            "start changed its attention weights by {random_change:.2%} of their starting norm, "
            "the pretrained start by {pretrained_change:.2%}: {ratio:.1f} times as much. Part of "
            "that is where each began: a fresh layer matrix has a norm of {random_norm:.3g} on "
            "average, a pretrained one {pretrained_norm:.3g}. In absolute terms, ||W_end - "
            "W_start||, a random-start matrix moved by {random_abs:.3g} on average and a "
            "pretrained one by {pretrained_abs:.3g}."
        ),
        "pretrained.moved_pretrained_more": (
            "How far the weights moved: averaged over the layers and Wq/Wk/Wv/W0, the pretrained "
            "start changed its attention weights by {pretrained_change:.2%} of their starting "
            "norm, the random start by {random_change:.2%}: {ratio:.1f} times as much. A fresh "
            "layer matrix has a norm of {random_norm:.3g} on average, a pretrained one "
            "{pretrained_norm:.3g}. In absolute terms, ||W_end - W_start||, a random-start matrix "
            "moved by {random_abs:.3g} on average and a pretrained one by {pretrained_abs:.3g}."
        ),
        "pretrained.reuse": (
            "That is why people reuse pretrained Wq/Wk/Wv/W0: they already hold what attention "
            "learned in pretraining, fine-tuning adjusts them by {pretrained_change:.2%}, and "
            "the same {steps} steps from random weights ended behind ({metric} {random:.4f} "
            "against {pretrained:.4f}). Training them from scratch is pretraining itself: far more "
            "data and steps than a fine-tune."
        ),
        "pretrained.unclear": (
            "In this run the pretrained start did not end ahead on {metric}, so these numbers do "
            "not show the advantage of reusing the weights; {steps} steps may be too few to tell: "
            "try a longer run with --steps."
        ),
        "pretrained.figure": (
            "Training loss of both runs (left) and relative change of Wq/Wk/Wv/W0 by layer "
            "(right; solid: pretrained start, dashed: random start)"
        ),
        "lora.title": "LoRA or full fine-tuning: what each does to Wq, Wk, Wv and W0",
        "lora.setup": (
            "{model} was fine-tuned twice for {task} on {dataset}: {steps} steps of {batch_size} examples ({train_samples} training rows, {max_length} tokens, seed {seed}), evaluated on {eval_samples} rows. "
            "Full: every weight trained, learning rate {full_lr:g}. LoRA (Hu et al. 2021, through peft): every pretrained weight frozen, and beside each of {targets} a trained (alpha/r)·B·A with r = {rank}, alpha = {alpha:g}, learning rate {lora_lr:g}; the effective weight is W + (alpha/r)·B·A."
        ),
        "lora.quantity": "after {steps} steps",
        "lora.run_full": "full",
        "lora.run_lora": "LoRA r={rank}",
        "lora.trainable": "trainable parameters",
        "lora.trainable_share": "share of all parameters",
        "lora.seconds": "seconds (whole run)",
        "lora.samples_per_second": "training samples/s",
        "lora.peak_rss": "peak RSS of the process (MB)",
        "lora.memory_note": (
            "Peak memory is the peak resident set size of each training process (the kernel's getrusage of the child): it includes Python, torch and the data, so the difference between the runs, {saved:.0f} MB, is what LoRA saved in gradients and optimizer state. torch's allocator statistics are not used: they exist for CUDA only."
        ),
        "lora.matrix_table": "Per layer and matrix (full | LoRA): numerical rank of ΔW (singular values above {tolerance:g} of the largest), Hu et al.'s subspace similarity φ of the top-{rank} output directions of W and ΔW, amplification ||ΔW|| / ||U^T W V||, and intruder dimensions (of the top {k} singular vectors, max |cos| < {epsilon:g})",
        "lora.rank": "rank ΔW",
        "lora.phi": "φ out",
        "lora.amp": "amp.",
        "lora.intruders": "intruders",
        "lora.top_heads": "Heads that moved most (all four matrices, relative change): full {full}; LoRA {lora}.",
        "lora.claim.low_rank.yes": "Reproduced (Hu et al.): LoRA's change has rank at most r = {rank} in every adapted matrix (largest {lora_max_rank}), while the full fine-tune's has median rank {full_median_rank:g}.",
        "lora.claim.low_rank.no": "Not reproduced as stated (Hu et al.'s low-rank update): LoRA's largest ΔW rank is {lora_max_rank} with r = {rank}, the full fine-tune's median {full_median_rank:g}.",
        "lora.claim.not_top_directions.yes": "Reproduced (Hu et al. §7): ΔW's top-{rank} directions are not W's top-{rank} directions: mean φ {similarity:.3f} (1 = the same subspace; random subspaces give about {random:.3f}).",
        "lora.claim.not_top_directions.no": "Not reproduced (Hu et al. §7): ΔW's top-{rank} directions overlap W's top directions, mean φ {similarity:.3f} (random subspaces: about {random:.3f}).",
        "lora.claim.amplifies.yes": "Reproduced (Hu et al. §7): ΔW amplifies the directions it acts on: median ||ΔW|| / ||U^T W V|| = {amplification:.2f} > 1 (they report about 21.5 for r = 4 on GPT-3).",
        "lora.claim.amplifies.no": "Not reproduced (Hu et al. §7): the median amplification ||ΔW|| / ||U^T W V|| is {amplification:.2f}, not above 1 (they report about 21.5 for r = 4 on GPT-3 after full training); a run this short may be too small a change.",
        "lora.claim.lora_intruders.yes": "Reproduced (Shuttleworth et al.): LoRA created {lora} intruder dimensions (new high-ranking singular vectors unlike every pretrained one); the full fine-tune {full}.",
        "lora.claim.lora_intruders.no": "Not reproduced (Shuttleworth et al.): LoRA created no intruder dimensions in this run (full fine-tune: {full}); they appear as the update grows (more steps, a higher learning rate).",
        "lora.claim.full_no_intruders.yes": "Reproduced (Shuttleworth et al.): the full fine-tune has fewer intruder dimensions than LoRA, or none ({full} against {lora}).",
        "lora.claim.full_no_intruders.no": "Not reproduced (Shuttleworth et al.): the full fine-tune has {full} intruder dimensions, LoRA {lora}.",
        "lora.claim.on_par.yes": "Reproduced (both papers): LoRA reaches about the full fine-tune's {metric} ({lora:.4f} against {full:.4f}).",
        "lora.claim.on_par.no": "Not reproduced (both papers): LoRA stays behind the full fine-tune's {metric} ({lora:.4f} against {full:.4f}) after this short run.",
        "lora.figure": "Training loss of both runs (left), numerical rank of ΔW by layer (middle; dashed: r) and intruder dimensions by layer (right)",
    },
    "zh": {
        "model_line": "模型 {model}（家族 {family}）。",
        "figure": "图",
        "layer": "层",
        "head": "头",
        "role": "矩阵",
        "not_applicable": "已跳过：{reason}。",
        "skip.softmax_alibi": "softmax 一课不适用于 {family} 模型：它们的注意力分数在 q . k * scale 之上还加了 ALiBi 位置偏置（verify 会检查它们）",
        "skip.softmax_relative_bias": "softmax 一课不适用于 {family} 模型：它们的注意力分数在 q . k * scale 之上还加了学习得到的相对位置偏置（verify 会检查它们）",
        "skip.softmax_cap": "softmax 一课不适用于 {family} 模型：它们的注意力分数对 q . k * scale 做了软截断（soft-capping，verify 会检查它们）",
        "skip.qkv_narrow": "qkv 一课不适用于这个 {family} 模型：它的损失把 {d_model} 维的隐藏状态与词元嵌入（权重共享）打分，而这里的嵌入只有 {width} 维",
        "w0.title": "问题一：为什么只有一个 W0，而不是每个头一个输出矩阵？",
        "w0.shapes": (
            "在第 {layer} 层，{n_heads} 个头各输出一个 z_i，形状为 {z_shape}（词元数 x d_head，"
            "取第一个输入的 {tokens} 个词元）。并排拼接得到 Concat(z) {concat_shape}；"
            "W0 的形状是 {w0_shape}，把拼接结果映射为注意力块的输出 {output_shape}。"
        ),
        "w0.identity": (
            "W0 的第 {d_head}*i 到 {d_head}*(i+1)-1 行属于第 i 个头，记作 w0[i] [{d_head}, {d_model}]。"
            "因此 Concat(z) @ W0 = sum_i z_i @ w0[i]。在这些输入上，两种算法最多相差 {concat_diff:.1e}，"
            "而求和（加上 b0）与模型自己的注意力输出相差不超过 {model_diff:.1e}。"
        ),
        "w0.why_one": (
            "所以 W0 是一个矩阵，它的行块分属各个头：每个头通过自己的行块写入全部 {d_model} 个输出维度，"
            '求和把各个头找到的信息混合在一起。输出端没有 "W1..W{n_heads}"，因为每个头自己的矩阵早已存在：'
            "它们就是 Wq、Wk、Wv 的切片（以及 W0 的行块 w0[i]）。"
        ),
        "w0.square": (
            '常见的说法是 W0 "降低维度"。这里并非如此：h*d_head = {n_heads}*{d_head} = {width} = d_model，'
            "W0 是方阵 {w0_shape}，去掉它模型的尺寸也不会变小。它的数值秩是 {rank}/{width}"
            "（奇异值从 {smax:.3g} 到 {smin:.3g}）。"
        ),
        "w0.reduces": (
            "这里 h*d_head = {n_heads}*{d_head} = {width} 大于 d_model = {d_model}：W0 确实把维度从 "
            "{width} 降到 {d_model}。它的数值秩是 {rank}。"
        ),
        "w0.expands": (
            "这里 h*d_head = {n_heads}*{d_head} = {width} 小于 d_model = {d_model}：W0 把拼接结果扩展到 "
            "d_model。它的数值秩是 {rank}。"
        ),
        "w0.experiment": (
            "W0 到底做了什么，用数字来看：替换第 {layer} 层的 W0（保留 b0），让真实模型在 {n_inputs} "
            "个输入上运行。表中是相对变化 ||新 - 旧|| / ||旧||：该层注意力输出的变化，以及模型最终隐藏状态的变化。"
            "（用同样的方式把原来的 W0 放回去，最终状态只变化 {reinserted:.1e}。）"
            "单位矩阵让 Concat(z) 不经混合直接输出：第 i 个头的输出只落在它自己的 {d_head} 个维度上。"
            '"所有头都用 w0[j]" 是把第 j 个头的行块重复 {n_heads} 次拼成的 W0 {w0_shape}，'
            "它计算的是 (sum_i z_i) @ w0[j]：所有头都通过同一个头的映射写出。"
        ),
        "w0.no_identity": "没有尝试单位矩阵：W0 {w0_shape} 不是方阵。",
        "w0.identity_row": "单位矩阵",
        "w0.repeat_row": "所有头都用 w0[{head}]",
        "w0.replacement": "W0 替换为",
        "w0.layer_change": "该层输出变化",
        "w0.final_change": "最终输出变化",
        "w0.summary": (
            "在这些替换下，该层注意力输出变化 {min_layer:.0%} 到 {max_layer:.0%}，模型最终输出变化 "
            "{min_final:.0%} 到 {max_final:.0%}：这就是模型对这一层 W0 学到的混合方式的依赖程度。"
        ),
        "w0.figure": "每个头的行块中 |W0| 的平均值（行：头，列：输出维度）",
        "softmax.title": "问题二：一步一步算 softmax（第 {layer} 层，第 {head} 个头）",
        "softmax.intro": (
            "\"{text}\" 中的第 {query} 个词元 '{query_token}' 作为查询，可以关注 {n_keys} 个词元。"
            "每个分数是 q . k_j（长度为 d_head = {d_head} 的向量）乘以模型的缩放系数 {scale:.4g}"
            "（1/sqrt(d_head) = {inv_sqrt:.4g}）。"
        ),
        "softmax.key": "键",
        "softmax.token": "词元",
        "softmax.raw": "q.k",
        "softmax.scaled": "x 缩放",
        "softmax.shifted": "- 最大值",
        "softmax.exp": "exp",
        "softmax.prob": "/ 总和",
        "softmax.model": "模型",
        "softmax.steps": (
            "最大的分数是 {largest:.4f}。减去它之后所有指数都 <= 0，所以每个 exp 都在 (0, 1] 之间；"
            "它们的总和是 {exp_sum:.4f}，除以总和就得到加起来等于 1 的概率。"
        ),
        "softmax.check": "模型自己的注意力行（output_attentions）与此最多相差 {diff:.1e}。",
        "softmax.overflow": (
            "为什么要减去最大分数：在 float16 中 x 超过 {f16:.2f}、在 float32 中超过 {f32:.2f} 时，exp(x) "
            "就变成无穷大。给所有分数加上同一个常数不会改变 softmax（每个 exp 都乘以同一个因子），"
            "所以下表把这些分数平移，直到最大值越过各自的界限，并用两种精度分别计算两种公式："
        ),
        "softmax.largest": "最大分数",
        "softmax.dtype": "精度",
        "softmax.naive_nonfinite": "直接公式：inf/NaN 个数",
        "softmax.naive_error": "直接公式：最大误差",
        "softmax.stable_error": "稳定公式：最大误差",
        "softmax.broken": "失败",
        "softmax.overflow_summary": (
            "直接公式 exp(s) / sum exp(s) 在 {cases} 种情况中有 {broken} 种失败（inf 或 NaN）；"
            "exp(s - max) / sum exp(s - max) 在 {cases} 种情况中有 {stable_ok} 种保持有限。"
        ),
        "softmax.race": (
            "赛跑的比喻：词元是选手，分数是每人跑出的距离。只有落后领先者多少才重要（这就是减去最大值）。"
            "'{leader}' 以 {leader_score:.2f} 领先，拿到 {leader_prob:.1%} 的注意力。'{second}' 落后 "
            "{gap:.2f}，所以得到领先者份额的 e^-{gap:.2f} = {ratio:.3f} 倍：{second_prob:.1%}。"
            "最后一名 '{last}' 落后 {last_gap:.2f}，得到 {last_prob:.2%}。"
        ),
        "softmax.figure": "查询 '{query_token}' 的注意力（第 {layer} 层，第 {head} 个头）",
        "qkv.title": "问题三：Wq、Wk、Wv 从哪里来，又是怎样被调整的",
        "qkv.init": (
            "训练之前，{family} 把 Wq、Wk、Wv 的每个元素从 normal(0, {std}) 中抽取"
            "（配置中的 initializer_range），偏置设为 0。按同一配置新初始化的模型（种子 {seed}）"
            "平均标准差为 {init_std:.4f}；训练后的权重为 {trained_std:.4f}。"
        ),
        "qkv.init_unknown": (
            "配置中没有 initializer_range；按同一配置新初始化的模型（种子 {seed}）平均标准差为 "
            "{init_std:.4f}；训练后的权重为 {trained_std:.4f}。"
        ),
        "qkv.std_init": "初始标准差",
        "qkv.std_trained": "训练后标准差",
        "qkv.sv_init": "初始 σ 最大",
        "qkv.sv_trained": "训练后 σ 最大",
        "qkv.sv_median_init": "初始 σ 中位数",
        "qkv.sv_median_trained": "训练后 σ 中位数",
        "qkv.spectra_steeper": (
            "奇异值：新初始化的随机矩阵最大值/中位数平均为 {init_ratio:.1f}，训练后为 "
            "{trained_ratio:.1f}：训练把权重集中到了更少的方向上。"
        ),
        "qkv.spectra_flatter": (
            "奇异值：新初始化的随机矩阵最大值/中位数平均为 {init_ratio:.1f}，训练后为 "
            "{trained_ratio:.1f}：训练并没有把权重集中到更少的方向上。"
        ),
        "qkv.loss_masked": (
            '在 "{text}" 上做一次反向传播。这里自己定义一个不需要任务头的损失（{model} 按基础模型运行）：把第 {position} '
            "个词元 '{token}' 换成掩码词元，用最终隐藏状态去预测它，打分用模型自己的输入词嵌入"
            "（权重共享）；损失 = 交叉熵 = {loss:.4f}。dropout 已关闭。"
        ),
        "qkv.loss_next": (
            '在 "{text}" 上做一次反向传播。损失：用最终隐藏状态预测每一个下一个词元，打分用模型自己的'
            "输入词嵌入（权重共享）；损失 = 平均交叉熵 = {loss:.4f}。dropout 已关闭。"
        ),
        "w0.shared_kv": (
            "这个模型使用分组查询注意力（GQA）：{n_heads} 个查询头共享 {n_kv_heads} 个键/值头，每组 {group} 个查询头"
            "（第 i 个查询头读取第 i // {group} 个键/值头）。同一组的头对同一组值 v 加权，但注意力模式各不相同，"
            "所以它们的 z_i 不同；W0 仍然为每个查询头保留一个行块 w0[i]，Concat(z) 的宽度仍是 {n_heads} x d_head。"
        ),
        "w0.shared_kv_one": (
            "这个模型使用多查询注意力（MQA）：全部 {n_heads} 个查询头读取同一个键/值头。它们对同一组值 v 加权，"
            "但注意力模式各不相同，所以它们的 z_i 不同；W0 仍然为每个查询头保留一个行块 w0[i]，"
            "Concat(z) 的宽度仍是 {n_heads} x d_head。"
        ),
        "qkv.shared_kv_one": (
            "这里 wk 和 wv 只有 1 个头，对应 {n_heads} 个查询头（多查询注意力）：它的梯度是全部 {n_heads} 个"
            "查询头对它的要求之和；下面逐头表格中 wk、wv 只有一行。"
        ),
        "qkv.shared_kv": (
            "这里 wk 和 wv 只有 {n_kv_heads} 个头，对应 {n_heads} 个查询头：每个键/值头由 {group} 个查询头共享，"
            "所以它的梯度是这 {group} 个查询头对它的要求之和；下面逐头表格中 wk、wv 的行是键/值头，而不是查询头。"
        ),
        "qkv.grad_table": "每层的梯度范数 ||dL/dW||",
        "qkv.grad_head_table": "{role} 的梯度范数，按头（行）和层（列）",
        "qkv.sgd": (
            "学习率 lr = {lr:g} 的一步 SGD 令 W <- W - lr * dL/dW。在所有层上，"
            "max |delta W - (-lr * dL/dW)| = {diff:.1e}（float32 舍入误差）；这一步让 Wq、Wk、Wv "
            "变化了其范数的 {min_rel:.3%} 到 {max_rel:.3%}，损失从 {loss:.4f} 变为 {loss_after:.4f}。"
        ),
        "qkv.figure": "每层 Wq、Wk、Wv 的奇异值：新初始化（虚线）与训练后（实线）",
        "pretrained.title": "问题四：Wq、Wk、Wv 是从头训练，还是沿用预训练的权重？",
        "pretrained.setup": (
            "在 {model} 上把同一次微调跑两遍（{dataset} 上的 {task}）：{steps} 步，每步 {batch_size} "
            "个样本（最多 {train_samples} 条训练数据，每条 {max_length} 个词元），学习率 {lr:g}，"
            "种子 {seed}，最后在最多 {eval_samples} 条留出数据上评估。第一遍从预训练权重开始；"
            "第二遍从同一架构的全新初始化开始，用模型自己的初始化方法和同一个种子抽取。"
            "数据相同、顺序相同、优化器相同：只有起始权重不同。"
        ),
        "pretrained.quantity": "{steps} 步之后",
        "pretrained.train_loss": "训练损失（最后 {n} 步的平均）",
        "pretrained.seconds": "秒",
        "pretrained.run_pretrained": "预训练起点",
        "pretrained.run_random": "随机起点",
        "pretrained.metric_better": (
            "预训练起点的 {metric} 达到 {pretrained:.4f}，随机起点为 {random:.4f}："
            "数据和步数相同，沿用预训练权重得到了更好的模型。"
        ),
        "pretrained.metric_worse": (
            "这一次随机起点的 {metric} 更好：{random:.4f}，预训练权重起点为 {pretrained:.4f}。"
        ),
        "pretrained.metric_equal": "两次运行的 {metric} 相同，都是 {pretrained:.4f}。",
        "pretrained.loss_line": (
            "验证损失：预训练起点 {pretrained_loss:.4f}，随机起点 {random_loss:.4f}。"
        ),
        "pretrained.change_table": "按层的相对变化 ||W_结束 - W_开始|| / ||W_开始||",
        "pretrained.start_norm": "||W_开始|| {run}",
        "pretrained.moved_random_more": (
            "权重移动了多远：对所有层和 Wq/Wk/Wv/W0 取平均，随机起点的注意力权重变化了起始范数的 "
            "{random_change:.2%}，预训练起点变化了 {pretrained_change:.2%}：是它的 {ratio:.1f} 倍。"
            "部分原因在于起点：新初始化的一层矩阵范数平均为 {random_norm:.3g}，预训练的为 "
            "{pretrained_norm:.3g}。按绝对量 ||W_结束 - W_开始|| 计算，随机起点的矩阵平均移动了 "
            "{random_abs:.3g}，预训练的矩阵平均移动了 {pretrained_abs:.3g}。"
        ),
        "pretrained.moved_pretrained_more": (
            "权重移动了多远：对所有层和 Wq/Wk/Wv/W0 取平均，预训练起点的注意力权重变化了起始范数的 "
            "{pretrained_change:.2%}，随机起点变化了 {random_change:.2%}：是它的 {ratio:.1f} 倍。"
            "新初始化的一层矩阵范数平均为 {random_norm:.3g}，预训练的为 {pretrained_norm:.3g}；"
            "按绝对量 ||W_结束 - W_开始|| 计算，随机起点的矩阵平均移动了 {random_abs:.3g}，"
            "预训练的矩阵平均移动了 {pretrained_abs:.3g}。"
        ),
        "pretrained.reuse": (
            "这就是人们沿用预训练 Wq/Wk/Wv/W0 的原因：它们已经包含了注意力在预训练中学到的东西，"
            "微调只把它们调整了 {pretrained_change:.2%}；而从随机权重出发的同样 {steps} 步落在了后面"
            "（{metric} {random:.4f}，对比 {pretrained:.4f}）。从头训练它们就是预训练本身："
            "所需的数据和步数远远多于一次微调。"
        ),
        "pretrained.unclear": (
            "在这次运行中，预训练起点的 {metric} 没有领先，所以这些数字没有显示出沿用权重的优势；"
            "{steps} 步可能太少，看不出差别：可以用 --steps 跑得更久一些。"
        ),
        "pretrained.figure": (
            "两次运行的训练损失（左）与 Wq/Wk/Wv/W0 按层的相对变化（右；实线：预训练起点，虚线：随机起点）"
        ),
        "lora.title": "LoRA 还是全量微调：两者各自如何改变 Wq、Wk、Wv 和 W0",
        "lora.setup": (
            "{model} 在 {dataset} 上做 {task}，微调了两次：{steps} 步，每步 {batch_size} 个样本（{train_samples} 行训练数据，{max_length} 个 token，随机种子 {seed}），在 {eval_samples} 行上评估。"
            "全量：训练所有权重，学习率 {full_lr:g}。LoRA（Hu 等 2021，用 peft）：冻结所有预训练权重，在 {targets} 旁各训练一个 (alpha/r)·B·A，r = {rank}，alpha = {alpha:g}，学习率 {lora_lr:g}；实际生效的权重是 W + (alpha/r)·B·A。"
        ),
        "lora.quantity": "{steps} 步之后",
        "lora.run_full": "全量",
        "lora.run_lora": "LoRA r={rank}",
        "lora.trainable": "可训练参数",
        "lora.trainable_share": "占全部参数的比例",
        "lora.seconds": "秒（整个运行）",
        "lora.samples_per_second": "训练样本/秒",
        "lora.peak_rss": "进程峰值常驻内存（MB）",
        "lora.memory_note": (
            "峰值内存是每个训练进程的峰值常驻内存（内核对子进程的 getrusage）：其中包括 Python、torch 和数据，所以两次运行之差 {saved:.0f} MB 才是 LoRA 在梯度和优化器状态上省下的。这里没有用 torch 分配器的统计：它只对 CUDA 有。"
        ),
        "lora.matrix_table": "按层和矩阵（全量 | LoRA）：ΔW 的数值秩（大于最大奇异值 {tolerance:g} 倍的奇异值个数）、Hu 等的子空间相似度 φ（W 与 ΔW 的前 {rank} 个输出方向）、放大倍数 ||ΔW|| / ||U^T W V||，以及入侵维度（前 {k} 个奇异向量中，最大 |cos| < {epsilon:g} 的个数）",
        "lora.rank": "ΔW 的秩",
        "lora.phi": "φ 输出",
        "lora.amp": "放大",
        "lora.intruders": "入侵维度",
        "lora.top_heads": "变化最大的头（四个矩阵合计的相对变化）：全量 {full}；LoRA {lora}。",
        "lora.claim.low_rank.yes": "复现（Hu 等）：LoRA 的变化在每个被适配的矩阵里秩都不超过 r = {rank}（最大 {lora_max_rank}），而全量微调的中位秩是 {full_median_rank:g}。",
        "lora.claim.low_rank.no": "未按原样复现（Hu 等的低秩更新）：LoRA 的 ΔW 最大秩是 {lora_max_rank}，r = {rank}；全量微调的中位秩 {full_median_rank:g}。",
        "lora.claim.not_top_directions.yes": "复现（Hu 等 §7）：ΔW 的前 {rank} 个方向不是 W 的前 {rank} 个方向：平均 φ 为 {similarity:.3f}（1 表示同一子空间；随机子空间约为 {random:.3f}）。",
        "lora.claim.not_top_directions.no": "未复现（Hu 等 §7）：ΔW 的前 {rank} 个方向与 W 的主要方向重合，平均 φ 为 {similarity:.3f}（随机子空间约 {random:.3f}）。",
        "lora.claim.amplifies.yes": "复现（Hu 等 §7）：ΔW 放大了它作用的方向：||ΔW|| / ||U^T W V|| 的中位数为 {amplification:.2f} > 1（他们在 GPT-3 上 r = 4 时报告约 21.5）。",
        "lora.claim.amplifies.no": "未复现（Hu 等 §7）：放大倍数 ||ΔW|| / ||U^T W V|| 的中位数是 {amplification:.2f}，没有超过 1（他们在 GPT-3 完整训练后 r = 4 时报告约 21.5）；这么短的运行，变化可能还太小。",
        "lora.claim.lora_intruders.yes": "复现（Shuttleworth 等）：LoRA 产生了 {lora} 个入侵维度（新的、排名靠前的奇异向量，与所有预训练奇异向量都不相似）；全量微调为 {full} 个。",
        "lora.claim.lora_intruders.no": "未复现（Shuttleworth 等）：这次运行中 LoRA 没有产生入侵维度（全量微调：{full}）；更新变大（更多步数、更高学习率）时它们才会出现。",
        "lora.claim.full_no_intruders.yes": "复现（Shuttleworth 等）：全量微调的入侵维度比 LoRA 少或没有（{full} 对 {lora}）。",
        "lora.claim.full_no_intruders.no": "未复现（Shuttleworth 等）：全量微调有 {full} 个入侵维度，LoRA 有 {lora} 个。",
        "lora.claim.on_par.yes": "复现（两篇论文）：LoRA 的 {metric} 与全量微调相当（{lora:.4f} 对 {full:.4f}）。",
        "lora.claim.on_par.no": "未复现（两篇论文）：这次短运行后，LoRA 的 {metric} 落后于全量微调（{lora:.4f} 对 {full:.4f}）。",
        "lora.figure": "两次运行的训练损失（左）、按层的 ΔW 数值秩（中；虚线：r）和按层的入侵维度（右）",
    },
}


def resolve_language(lang: str | None = None) -> str:
    """`lang` if given, else Chinese when the locale (LC_ALL, LC_MESSAGES, LANG, then Python's
    locale) starts with 'zh', else English."""
    if lang:
        return lang
    candidates = [os.environ.get(name) for name in ("LC_ALL", "LC_MESSAGES", "LANG")]
    candidates.append(locale.getlocale()[0])
    for value in candidates:
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def say(lang: str, key: str, **values) -> str:
    """The prose for `key` in `lang` with the numbers filled in."""
    return TEXT[lang][key].format(**values)
