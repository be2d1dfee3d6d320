"""A classification head from public values only: the encoder's features of each class name.

``lora.head-init = "class-names"`` sets the head (one ``nn.Linear``, d → K) before round 1 from
nothing but the pretrained encoder and the K class names, which are public (they name the
task, not an example). For class k, x_k (d,) is the feature the head reads (BERT: the pooler
output of the [CLS] token) for the text of its name ("comp.graphics" → "comp graphics"):

    u_k = x_k / ‖x_k‖,    W_k = τ · (u_k − ū),    ū = (1/K) Σ_k u_k,    b = 0,
    τ = 1 / mean_k std_j (x_k · (u_j − ū))

so the head scores a text by the cosine of its features with each class name's, and τ makes
the names' own logits spread by about 1 (the scale a freshly initialised head has), not by the
0.1 that raw cosines between pooled features give. Subtracting ū from every row adds the same
−τ x·ū to every logit of a text, which changes neither its softmax, its loss nor its prediction,
and its gradient under cross-entropy is zero; but it removes the part the names share. Pooled
features are far from isotropic (every text's points in much the same direction), so without
it every logit would carry a large common term τ x·ū on top of the differences that decide:
on an encoder that barely tells the names apart (τ large) that term reached 1.7e5 with
differences of order 10, which float32 cannot resolve. No training example is read, so the head
spends no privacy, and the server computes it once and sends it to every node with the LoRA
factors. With ``lora.train-head = false`` it stays as it is (a public, frozen head); with true
it is where the trained head starts.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from transformers import PreTrainedTokenizerBase


def head_linear(model: PeftModel) -> torch.nn.Linear:
    """The head's trainable ``nn.Linear``; raise if the head is anything else."""
    heads = [module.modules_to_save[model.active_adapter] for module in model.modules()
             if isinstance(module, ModulesToSaveWrapper)]
    if len(heads) != 1 or not isinstance(heads[0], torch.nn.Linear):
        raise ValueError("lora.head-init='class-names' needs a head that is one nn.Linear "
                         f"(found {[type(h).__name__ for h in heads]}); use 'random'")
    return heads[0]


def name_text(label: str) -> str:
    """A class name as text: separators become spaces ("rec.sport.hockey" → "rec sport hockey")."""
    return " ".join(label.replace(".", " ").replace("_", " ").replace("-", " ").split())


def duplicate_name_texts(label_names: tuple[str, ...],
                         tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, str]]:
    """Pairs of class names the encoder reads as the same tokens: their head rows would be equal.

    The tokenizer decides, not a rule of ours: for an uncased model "sci.space" and "Sci_Space"
    are one text, for a cased one "Spam" and "spam" are two. Two identical rows of a frozen
    head give the two classes the same logit for every text, so the model could never tell
    them apart; ``server.preflight.check_run`` refuses such names.
    """
    first: dict[tuple[int, ...], str] = {}
    pairs = []
    for name in label_names:
        tokens = tuple(tokenizer(name_text(name))["input_ids"])
        if tokens in first:
            pairs.append((first[tokens], name))
        else:
            first[tokens] = name
    return pairs


def names_without_letters(label_names: tuple[str, ...]) -> list[str]:
    """The class names with no letter in them ("0", "1"): the head cannot read a meaning there.

    Their head rows are still distinct, fixed and public (the encoder's features of "0" and
    "1"), so the adapter can learn against them, but not from what the names say.
    """
    return [name for name in label_names if not any(c.isalpha() for c in name)]


@torch.no_grad()
def name_features(model: PeftModel, tokenizer: PreTrainedTokenizerBase,
                  label_names: tuple[str, ...]) -> torch.Tensor:
    """The input of the head for each class name's text, (K, d) float32, in eval mode."""
    head = head_linear(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch = tokenizer([name_text(n) for n in label_names], padding=True, return_tensors="pt")
        model(**batch.to(device))  # with the tokenizer's segment ids, if any (zeros: one text)
    finally:
        hook.remove()
        model.train(was_training)
    return captured[0].float()


@torch.no_grad()
def set_class_name_head(model: PeftModel, tokenizer: PreTrainedTokenizerBase,
                        label_names: tuple[str, ...]) -> None:
    """Set the head's weight to the scaled, centred, normalised class-name features, bias 0."""
    head = head_linear(model)
    if head.out_features != len(label_names):
        raise ValueError(f"the head has {head.out_features} outputs for {len(label_names)} "
                         "class names")
    features = name_features(model, tokenizer, label_names).double()  # float64: see below
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # In float32 the mean's own rounding (eps·|ū|, times τ) would leave a common term again
    centred = unit - unit.mean(dim=0, keepdim=True)
    spread = (features @ centred.T).std(dim=1).mean().clamp_min(1e-12)
    head.weight.copy_((centred / spread).to(head.weight.dtype))
    if head.bias is not None:
        head.bias.zero_()
