"""Adapters and checkpoints out of (and back into) jtinker.

* :func:`export_peft` writes a LoRA in Hugging Face PEFT's on-disk format (``adapter_config.json`` +
  ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` and vLLM load as-is.
* :func:`import_peft` reads such an adapter (ours or one PEFT saved) back into a :class:`Lora`.
* :func:`export_merged` writes a full HF model directory with the adapter folded into the weights,
  streaming one tensor at a time so host memory never holds the whole model.

Layouts: our kernels and LoRA factors are ``[in, out]`` (``a [in, r]``, ``b [r, out]``); PyTorch and
PEFT store ``[out, in]`` (``lora_A [r, in]``, ``lora_B [out, r]``), so every matrix is transposed
on the way out and back in.

Qwen3-MoE experts are written per expert, in the on-disk HF naming that PEFT (which fuses them for
transformers v5 on load) and vLLM accept: ``...layers.L.mlp.experts.E.gate_proj.lora_A.weight``;
merged exports likewise write ``model.layers.L.mlp.experts.E.gate_proj.weight``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from .models import lora as lora_lib
from .models.config import ModelConfig
from .models.loading import hf_shape, param_layout
from .models.lora import ALL_TARGETS, UNEMBED_TARGET, Lora, lead_shape, module_name, param_names, target_shape

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFETENSORS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"
# vLLM's ``max_lora_rank`` choices (vllm/config/lora.py); an adapter must fit one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PeftModel state-dict keys are the HF module path under this prefix (adapter name removed).
PEFT_PREFIX = "base_model.model."
# Non-weight files of a model directory that a merged export should carry over.
_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_NP_TO_SAFETENSORS = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
}
_TORCH_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float64): "float64",
}


# --------------------------------------------------------------------------------------------------
# PEFT key naming


def _peft_keys(config: ModelConfig, param: str) -> list[tuple[tuple[int, ...], str, str]]:
    """``(index into the stacked LoRA param, lora_A key, lora_B key)`` for every module it adapts.

    The index is ``()`` for lm_head, ``(stack row,)`` per layer, ``(stack row, expert)`` per expert.
    """
    if param == UNEMBED_TARGET:
        return [((), f"{PEFT_PREFIX}lm_head.lora_A.weight", f"{PEFT_PREFIX}lm_head.lora_B.weight")]
    hf_name, _, _ = param_layout(config)[("layers", param)]
    module = PEFT_PREFIX + hf_name.removesuffix(".weight")
    keys = []
    for row, i in enumerate(config.stack_layers(param)):
        experts = range(config.num_experts) if "{e}" in module else [None]
        for e in experts:
            name = module.format(i=i, e=e)
            keys.append(((row,) if e is None else (row, e), f"{name}.lora_A.weight", f"{name}.lora_B.weight"))
    return keys


# --------------------------------------------------------------------------------------------------
# export_peft


def peft_base_name(name: str, model_dir: Path) -> str:
    """The base model a PEFT adapter names: a built-in name means nothing outside jtinker, its
    directory does; registered names and paths stay as they are."""
    from jtinker import registry

    return str(model_dir) if name in registry.builtin_names() else name


MAX_AGE_RECIPIENTS = 10


def age_recipients(recipients: Sequence[str], field: str = "age_encryption_recipients") -> list:
    """Parsed age recipients (native ``age1...`` keys or SSH public keys); ValueError names the entry."""
    try:
        import pyrage
    except ImportError:
        raise ValueError(f"{field}: encrypting needs the pyrage package (pip install pyrage)") from None
    if len(recipients) > MAX_AGE_RECIPIENTS:
        raise ValueError(f"{field}: at most {MAX_AGE_RECIPIENTS} recipients, got {len(recipients)}")
    parsed = []
    for i, text in enumerate(recipients):
        kind = pyrage.ssh if isinstance(text, str) and text.startswith("ssh-") else pyrage.x25519
        try:
            parsed.append(kind.Recipient.from_str(text))
        except (pyrage.RecipientError, TypeError) as e:
            raise ValueError(f"{field}[{i}]: not an age1... key or an SSH public key ({e})") from None
    return parsed


def encrypt_files(directory: Path, recipients: list) -> None:
    """Replaces every file under ``directory`` by its age encryption, ``<name>.age``."""
    import pyrage

    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        pyrage.encrypt_file(str(path), f"{path}.age", recipients)
        path.unlink()


def _vllm_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(
        f"rank {rank} exceeds vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}); "
        "export with vllm_compatible=False"
    )


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(
    config: ModelConfig,
    lora: Lora,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str,
    vllm_compatible: bool = True,
) -> Path:
    """Writes ``lora`` as a PEFT LoRA adapter directory and returns its path.

    With ``vllm_compatible``, a rank outside vLLM's allowed set is zero-padded up to the next
    allowed rank and ``lora_alpha`` rescaled so that ``A @ B * scaling`` is unchanged.

    MoE experts get per-expert keys and ``gate_proj``/``up_proj``/``down_proj`` in ``target_modules``;
    PEFT (0.21, transformers v5) fuses them into ``target_parameters`` on load. That retargeting also
    catches the dense MLP of a mixed dense/sparse model, whose MLP adapters PEFT then drops; vLLM
    and :func:`import_peft` read them.
    """
    out = Path(out_dir)
    rank = lora.rank
    export_rank = _vllm_rank(rank) if vllm_compatible else rank
    alpha = float(lora.alpha)
    if export_rank != rank:
        # Zero rows/columns leave a @ b alone; only the scaling depends on r, so fix it through alpha.
        ratio = export_rank / rank
        alpha *= math.sqrt(ratio) if lora.use_rslora else ratio

    tensors: dict[str, np.ndarray] = {}
    for target, ab in lora.targets_tree().items():
        if module_name(target) not in ALL_TARGETS or target not in param_names(config, module_name(target)):
            raise ValueError(
                f"lora: unknown target {target!r} for this {config.model_type} model; "
                f"expected one of {ALL_TARGETS}"
            )
        a = np.asarray(jax.device_get(ab["a"]), dtype=np.float32)
        b = np.asarray(jax.device_get(ab["b"]), dtype=np.float32)
        fan_in, fan_out = target_shape(config, target)
        lead = lead_shape(config, target)
        if a.shape != (*lead, fan_in, rank) or b.shape != (*lead, rank, fan_out):
            raise ValueError(
                f"lora[{target!r}]: a {a.shape} / b {b.shape} do not match the config "
                f"(want {(*lead, fan_in, rank)} / {(*lead, rank, fan_out)}; one rank for every target)"
            )
        pad = export_rank - rank
        if pad:
            a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
            b = np.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
        for index, key_a, key_b in _peft_keys(config, target):
            tensors[key_a] = np.ascontiguousarray(a[index].T)  # [r, in]
            tensors[key_b] = np.ascontiguousarray(b[index].T)  # [out, r]

    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": export_rank,
        "lora_alpha": _json_number(alpha),
        "target_modules": sorted(lora.targets),
        "use_rslora": bool(lora.use_rslora),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_SAFETENSORS_NAME), metadata={"format": "pt"})
    # PEFT writes its config this way (indent=2, sort_keys=True).
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return out


# --------------------------------------------------------------------------------------------------
# import_peft


def _check_adapter_config(cfg: dict[str, Any]) -> None:
    """Refuses adapter settings a single-rank, plain-LoRA :class:`Lora` cannot represent."""
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json: peft_type={cfg.get('peft_type')!r}; only LORA is supported")
    if cfg.get("use_dora"):
        raise ValueError("adapter_config.json: use_dora=true (DoRA) is not supported")
    if cfg.get("modules_to_save"):
        raise ValueError(
            f"adapter_config.json: modules_to_save={cfg['modules_to_save']!r} is not supported "
            "(full-weight modules are not LoRA)"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(
                f"adapter_config.json: {key}={cfg[key]!r} is not supported (one rank and alpha everywhere)"
            )
    if cfg.get("fan_in_fan_out"):
        raise ValueError("adapter_config.json: fan_in_fan_out=true is not supported (Conv1D-style weights)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ValueError(
            f"adapter_config.json: bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r} is not "
            "supported (no bias terms)"
        )
    for key in ("layers_to_transform", "layers_pattern", "target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            raise ValueError(f"adapter_config.json: {key}={cfg[key]!r} is not supported")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"adapter_config.json: r={r!r} must be a positive int")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ValueError(f"adapter_config.json: lora_alpha={alpha!r} must be a number")


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    st = adapter_dir / ADAPTER_SAFETENSORS_NAME
    if st.is_file():
        return load_file(str(st))
    bin_file = adapter_dir / ADAPTER_BIN_NAME
    if bin_file.is_file():
        try:
            import torch  # only needed for legacy pickled adapters
        except ImportError as e:
            raise ImportError(
                f"{bin_file}: reading adapter_model.bin needs torch, which is not installed"
            ) from e
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
    raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_SAFETENSORS_NAME} or {ADAPTER_BIN_NAME}")


def _list_targets(target_modules: list[str]) -> set[str]:
    # PEFT matches list entries as exact names or dotted suffixes, so the last component names the module.
    names = {str(t).rsplit(".", 1)[-1] for t in target_modules}
    unsupported = sorted(names - set(ALL_TARGETS))
    if unsupported:
        raise ValueError(
            f"adapter_config.json: target module(s) {unsupported} are not supported; "
            f"supported LoRA targets: {list(ALL_TARGETS)}"
        )
    return names


def import_peft(adapter_dir: str | Path, config: ModelConfig) -> Lora:
    """Reads a PEFT LoRA adapter for a model with ``config`` into an f32 :class:`Lora`.

    Raises ``ValueError`` naming the problem for adapters a :class:`Lora` cannot represent
    (DoRA, ``modules_to_save``, per-module ranks, unsupported targets) or that are incomplete.
    """
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a PEFT adapter directory")
    cfg = json.loads(config_file.read_text())
    _check_adapter_config(cfg)
    rank = cfg["r"]
    tensors = _read_adapter_tensors(adapter_dir)

    # Every key we know how to read, for every param stack a supported target covers.
    known: dict[str, str] = {}
    for target in ALL_TARGETS:
        for param in param_names(config, target):
            for _, key_a, key_b in _peft_keys(config, param):
                known[key_a] = known[key_b] = param
    # PEFT's save_embedding_layers stores frozen base weights of embed/lm_head; like vLLM, skip them.
    present = {k for k in tensors if not k.endswith(".base_layer.weight")}
    unknown = sorted(present - known.keys())
    if unknown:
        more = " ..." if len(unknown) > 5 else ""
        raise ValueError(
            f"{adapter_dir}: adapter tensors not supported: {unknown[:5]}{more} "
            f"(supported: lora_A/lora_B of {list(ALL_TARGETS)})"
        )

    target_modules = cfg.get("target_modules")
    if isinstance(target_modules, list | tuple):
        targets = _list_targets(list(target_modules))
    else:
        # "all-linear", a regex, or PEFT's per-architecture default: the weights say what was adapted.
        targets = {module_name(known[k]) for k in present}
    if not targets:
        raise ValueError(f"{adapter_dir}: adapter has no LoRA weights")
    stray = sorted(k for k in present if module_name(known[k]) not in targets)
    if stray:
        raise ValueError(
            f"{adapter_dir}: tensors {stray[:5]} are not covered by target_modules={target_modules}"
        )

    weights: dict = {}
    for target in (p for t in ALL_TARGETS if t in targets for p in param_names(config, t)):
        fan_in, fan_out = target_shape(config, target)
        lead = lead_shape(config, target)
        a_list, b_list = [], []
        for _, key_a, key_b in _peft_keys(config, target):
            for key, want, out in ((key_a, (rank, fan_in), a_list), (key_b, (fan_out, rank), b_list)):
                if key not in tensors:
                    raise ValueError(f"{adapter_dir}: adapter tensor {key!r} is missing")
                t = tensors[key]
                if tuple(t.shape) != want:
                    raise ValueError(
                        f"{adapter_dir}: adapter tensor {key!r} has shape {tuple(t.shape)}, expected {want} "
                        f"(r={rank})"
                    )
                out.append(np.asarray(t, dtype=np.float32).T)
        ab = {  # _peft_keys lists modules in stacking order (layer-major, then expert)
            "a": jnp.asarray(np.stack(a_list).reshape(*lead, fan_in, rank)),
            "b": jnp.asarray(np.stack(b_list).reshape(*lead, rank, fan_out)),
        }
        if target == UNEMBED_TARGET:
            weights[target] = ab
        else:
            weights.setdefault("layers", {})[target] = ab
    return Lora(
        weights=weights, alpha=float(cfg["lora_alpha"]), use_rslora=bool(cfg.get("use_rslora", False))
    )


# --------------------------------------------------------------------------------------------------
# export_merged


@dataclasses.dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_safetensors(path: Path, entries: list[_Planned], progress: Any = None) -> None:
    """Writes one safetensors file, materialising one tensor at a time.

    The header needs only shapes and dtypes, so it goes first and each tensor's bytes follow as
    they are produced.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": _NP_TO_SAFETENSORS[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the reference writer aligns the data start to 8
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for e in entries:
            arr = np.ascontiguousarray(e.produce())
            if arr.shape != e.shape or arr.dtype != e.dtype:
                raise ValueError(f"{e.name}: produced {arr.shape} {arr.dtype}, planned {e.shape} {e.dtype}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            if progress is not None:
                progress.update(e.nbytes)
    os.replace(tmp, path)


def export_merged(
    model_dir: str | Path,
    config: ModelConfig,
    params: dict,
    lora: Lora | None,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: Any = None,
) -> Path:
    """Writes an HF model directory with ``lora`` merged into ``params`` and returns its path.

    ``model_dir`` supplies ``config.json``, the tokenizer files and ``generation_config.json``.
    Tensors keep the params' dtype unless ``dtype`` is given; ``config.json``'s dtype field follows.
    Weights larger than ``max_shard_bytes`` are split into shards with a
    ``model.safetensors.index.json``. A tied model whose ``lm_head`` is adapted gets an explicit
    ``lm_head.weight`` and ``tie_word_embeddings: false``.
    """
    src, out = Path(model_dir), Path(out_dir)
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"out_dir {out} is model_dir: refusing to overwrite the base model")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: must be positive, got {max_shard_bytes}")
    hf_config = json.loads((src / "config.json").read_text())
    lora_layers = lora.weights.get("layers", {}) if lora is not None else {}
    adapt_head = lora is not None and UNEMBED_TARGET in lora.weights
    untie = config.tie_word_embeddings and adapt_head
    layout = param_layout(dataclasses.replace(config, tie_word_embeddings=False) if untie else config)
    out_dtype = np.dtype(dtype) if dtype is not None else None

    def produce(path: tuple[str, ...], index: tuple[int, ...], transposed: bool) -> np.ndarray:
        if path[0] == "layers":
            # index = (stack row,) or (stack row, expert): merge just that one matrix
            name, keep = path[1], tuple(slice(j, j + 1) for j in index)
            w = params["layers"][name][keep]
            if name in lora_layers:
                ab = lora_layers[name]
                one = Lora(
                    weights={"layers": {name: {"a": ab["a"][keep], "b": ab["b"][keep]}}},
                    alpha=lora.alpha,
                    use_rslora=lora.use_rslora,
                )
                w = lora_lib.merge(config, {"layers": {name: w}}, one)["layers"][name]
            w = w.reshape(w.shape[len(index) :])
        elif path == ("lm_head",) and adapt_head:
            base = {k: params[k] for k in ("embed", "lm_head") if k in params}
            head = Lora(
                weights={UNEMBED_TARGET: lora.weights[UNEMBED_TARGET]},
                alpha=lora.alpha,
                use_rslora=lora.use_rslora,
            )
            w = lora_lib.merge(config, {"layers": {}, **base}, head)["lm_head"]
        else:
            w = params[path[0]]
        arr = np.asarray(jax.device_get(w))
        arr = arr.T if transposed else arr
        return arr.astype(out_dtype) if out_dtype is not None else arr

    def param_dtype(path: tuple[str, ...]) -> np.dtype:
        if out_dtype is not None:
            return out_dtype
        if path == ("lm_head",) and "lm_head" not in params:
            return np.dtype(params["embed"].dtype)  # merge keeps the tied embedding's dtype
        leaf = params["layers"][path[1]] if path[0] == "layers" else params[path[0]]
        return np.dtype(leaf.dtype)

    # HF order: embeddings, then layer by layer (expert by expert), then the final norm and head.
    def plan(path: tuple[str, ...], name: str, index: tuple[int, ...] = ()) -> _Planned:
        hf_name, transposed, shape = layout[path]
        shape_on_disk = hf_shape(hf_name, transposed, shape)
        return _Planned(name, shape_on_disk, param_dtype(path), lambda: produce(path, index, transposed))

    def plan_layer(path: tuple[str, ...], i: int) -> list[_Planned]:
        layers = config.stack_layers(path[1])
        if i not in layers:  # the dense MLP of a sparse layer, or the experts of a dense one
            return []
        hf_name, row = layout[path][0], layers.index(i)
        if "{e}" not in hf_name:
            return [plan(path, hf_name.format(i=i), (row,))]
        return [plan(path, hf_name.format(i=i, e=e), (row, e)) for e in range(config.num_experts)]

    top = [p for p in layout if p[0] != "layers"]
    per_layer = [p for p in layout if p[0] == "layers"]
    entries = [plan(p, layout[p][0]) for p in top if p == ("embed",)]
    entries += [e for i in range(config.num_layers) for p in per_layer for e in plan_layer(p, i)]
    entries += [plan(p, layout[p][0]) for p in top if p != ("embed",)]
    unsupported = {e.dtype for e in entries} - _NP_TO_SAFETENSORS.keys()
    if unsupported:
        raise ValueError(f"params: dtypes {sorted(map(str, unsupported))} cannot be written to safetensors")

    shards: list[list[_Planned]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes

    out.mkdir(parents=True, exist_ok=True)
    # Stale weights from an earlier export would be picked up next to (or instead of) the new ones.
    for stale in [out / "model.safetensors", out / "model.safetensors.index.json", *out.glob("model-*-of-*")]:
        stale.unlink(missing_ok=True)
    from tqdm.auto import tqdm

    # A bar on terminals only (disable=None): merging a large model takes a while.
    with tqdm(
        total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, desc="export", disable=None
    ) as bar:
        if len(shards) == 1:
            _write_safetensors(out / "model.safetensors", shards[0], bar)
        else:
            weight_map = {}
            for k, shard in enumerate(shards, start=1):
                file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(out / file, shard, bar)
                weight_map.update({e.name: file for e in shard})
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    if untie:
        hf_config["tie_word_embeddings"] = False
    dtype_name = _TORCH_DTYPE_NAMES[entries[0].dtype]  # the embedding's dtype stands for the model
    dtype_keys = [k for k in ("torch_dtype", "dtype") if k in hf_config] or ["torch_dtype"]
    for key in dtype_keys:
        hf_config[key] = dtype_name
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for name in _COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out
