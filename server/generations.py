"""A causal LM's own words at the end of a run: greedy continuations of fixed held-out prompts.

The prompts are the first examples of the evaluation split, the same in every run of a seed: a
prompt column's text where the data has one (instruction data), else the first quarter of the
text's tokens (at least 8), whose continuation shows what the adapted model has learnt of the
domain. Written beside the adapter as ``generations.json`` (:data:`common.schema.GENERATIONS_FILE`):
a list of {"prompt", "completion", "reference"}.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

NUM_PROMPTS = 3
NEW_TOKENS = 32


@torch.no_grad()
def generate_samples(model: PeftModel, tokenizer: PreTrainedTokenizerBase, examples: Dataset,
                     max_length: int, *, count: int = NUM_PROMPTS,
                     new_tokens: int = NEW_TOKENS) -> list[dict[str, str]]:
    """Greedy continuations of the first ``count`` examples' prompts (see the module docstring)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples = []
    try:
        for i in range(min(count, len(examples))):
            row = examples[i]
            if row.get("prompt") is not None:
                prompt, reference = row["prompt"], row["text"]
                ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
            else:
                tokens = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
                cut = max(8, len(tokens) // 4)
                ids, rest = tokens[:cut], tokens[cut:]
                prompt = tokenizer.decode(ids, skip_special_tokens=True)
                reference = tokenizer.decode(rest, skip_special_tokens=True)
            inputs = torch.tensor([ids], device=device)
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                 max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            completion = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
            samples.append({"prompt": prompt, "completion": completion, "reference": reference})
    finally:
        model.train(was_training)
    return samples
