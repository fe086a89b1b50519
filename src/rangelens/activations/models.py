"""Load models: the embedded built-ins (shipped inside PyPI packages), a GGUF file, or any hub id / local path.

``smollm2-135m`` is SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised); it is dequantised once and cached as
safetensors under the user cache dir so later loads take well under a second. ``minilm-l6`` is
all-MiniLM-L6-v2 (BERT encoder). A user's ``.gguf`` file (or a folder holding exactly one) goes through the
same conversion, cached under a key of the file's content hash.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

import torch
from rich.markup import escape
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from rangelens.artifacts import atomic_dir
from rangelens.assets import BUILTIN_MODELS, ModelKind, cache_dir, package_dir
from rangelens.config.analysis import Dtype
from rangelens.errors import RangelensError, choices
from rangelens.provenance import file_digest

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(Dtype)}


@dataclass
class LoadedModel:
    """A stock `transformers` model with its tokenizer and what rangelens needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    kind: ModelKind

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the embedding runs on (see :func:`input_device`)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


LOG_AFTER = 2.0  # seconds a step runs before a log (not a terminal) is told about it


@contextmanager
def working(text: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Say on stderr that a long step is running: a spinner with the elapsed time on a terminal,
    else one line per step once it has run ``LOG_AFTER`` seconds (a fast step, or a bad input
    that fails at once, leaves a log with nothing but its result or its one-line error); yields a
    function that changes the text. Silent when not ``enabled``."""
    if not enabled:
        yield lambda _text: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:  # a log: one unwrapped line per step that takes a while
        current = [text]
        lock = threading.Lock()
        shown = threading.Event()

        def show() -> None:
            with lock:
                shown.set()
                print(f"{current[0]} ...", file=sys.stderr, flush=True)

        def line(new: str) -> None:
            with lock:
                current[0] = new
                if shown.is_set():
                    print(f"{new} ...", file=sys.stderr, flush=True)

        timer = threading.Timer(LOG_AFTER, show)
        timer.daemon = True
        timer.start()
        try:
            yield line
        finally:
            timer.cancel()
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(escape(text), total=None)
        yield lambda new: progress.update(task, description=escape(new))


def input_device(model: torch.nn.Module) -> torch.device:
    """The device the model's input embedding runs on: where its inputs must be. On a model
    dispatched by accelerate (``device_map``) that is the embedding's execution device, even when
    its weights are offloaded (on ``meta`` until they are used)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is None:
        return next(model.parameters()).device
    hook = getattr(embedding, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    return next(embedding.parameters()).device


def _convert_gguf(src: Path, gguf_file: str, dest: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as safetensors (atomic directory rename)."""
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model while it still carries the quantizer.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (the attribute is typed non-optional)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(dest, replace=False) as tmp:  # if another process finished first, keep its
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def builtin_model_dir(name: str, say: Callable[[str], None] = lambda _text: None) -> Path:
    """Local directory holding the built-in model ``name`` in plain `transformers` format
    (``say`` hears when a GGUF file is dequantised, a one-time step of a minute or more)."""
    spec = BUILTIN_MODELS[name]
    pkg = package_dir(spec.package, f"built-in model {name!r}")
    if spec.gguf_file is None:
        return pkg / spec.subdir
    dest = cache_dir() / "models" / name
    if not (dest / "config.json").exists():
        say(f"dequantising {spec.gguf_file} (once; cached in {dest.parent})")
        _convert_gguf(pkg, spec.gguf_file, dest)
    return dest


def gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself if a ``.gguf`` file, the only ``.gguf`` in a folder without
    a ``config.json``; None for anything else. Several ``.gguf`` files in a folder are refused."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise RangelensError(
            f"folder {str(path)!r} holds {len(found)} .gguf files; give one as --model: "
            f"{choices([p.name for p in found])}"
        )
    return found[0] if found else None


def gguf_model_dir(file: Path, say: Callable[[str], None] = lambda _text: None) -> Path:
    """A GGUF checkpoint converted once (dequantised) into the cache, keyed by its content hash."""
    digest = file_digest(file, memo=cache_dir() / "digests.json")
    dest = cache_dir() / "models" / f"gguf-{digest[:16]}"
    if not (dest / "config.json").exists():
        say(f"dequantising {file.name} (once; cached in {dest.parent})")
        try:
            _convert_gguf(file.parent, file.name, dest)
        except (struct.error, EOFError, IndexError, OverflowError) as err:  # reading past the end
            raise RangelensError(
                f"cannot convert GGUF file {str(file)!r}: it is truncated or not a GGUF file "
                f"({err})".splitlines()[0]
            ) from err
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise RangelensError(
                f"cannot convert GGUF file {str(file)!r}: {err}".splitlines()[0]
            ) from err
    return dest


def _infer_kind(config: Any) -> ModelKind:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or getattr(
        config, "is_decoder", False
    ):
        return "decoder"
    return "encoder"


def load_model(
    name_or_path: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    kind: ModelKind | None = None,
    device_map: str | dict[str, int | str] | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load a built-in model name, a local directory or a Hugging Face hub id, in eval mode.

    Decoders load with their LM head (needed for perplexity and prompted classification); encoders as
    the bare encoder. Padding tokens are set for tokenizers that lack one. ``device_map`` (an
    accelerate strategy such as ``"auto"``, or module name -> device) spreads the model over
    devices instead of moving it to ``device``; hooks work on it unchanged and inputs go to the
    embedding's device. With ``progress``, stderr says it is loading (see :func:`working`).
    """
    if dtype not in DTYPES:
        raise RangelensError(f"unknown dtype {dtype!r}; valid: {choices(DTYPES)}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise RangelensError(f"unknown device {device!r}; valid: 'cpu', 'cuda', 'cuda:N'") from err
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RangelensError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    with working(f"loading model {name_or_path}", progress) as say:
        return _load(name_or_path, torch_device, dtype, kind, device_map, say)


def _load(
    name_or_path: str,
    torch_device: torch.device,
    dtype: str,
    kind: ModelKind | None,
    device_map: str | dict[str, int | str] | None,
    say: Callable[[str], None],
) -> LoadedModel:
    gguf = None if name_or_path in BUILTIN_MODELS else gguf_file(Path(name_or_path))
    if name_or_path in BUILTIN_MODELS:
        path: str | Path = builtin_model_dir(name_or_path, say)
        kind = kind or BUILTIN_MODELS[name_or_path].kind
    elif gguf is not None:
        path, kind = gguf_model_dir(gguf, say), kind or "decoder"
    else:
        path = name_or_path
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise RangelensError(
            f"model {name_or_path!r} is not a built-in ({choices(BUILTIN_MODELS)}), a local model "
            f"directory, a .gguf file, or a reachable Hugging Face hub id"
        ) from err
    kind = kind or _infer_kind(config)
    loader = AutoModelForCausalLM if kind == "decoder" else AutoModel
    hf_logging.disable_progress_bar()  # loading local safetensors takes well under a second
    try:
        placement: dict[str, Any] = {} if device_map is None else {"device_map": device_map}
        model = loader.from_pretrained(path, dtype=DTYPES[dtype], **placement)
    except (OSError, ValueError) as err:  # no weights; a device map that cannot hold the model
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RangelensError(f"model {name_or_path!r} cannot be loaded: {first}") from err
    finally:
        hf_logging.enable_progress_bar()
    if device_map is None:
        cast(Any, model).to(torch_device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path, kind=kind)
