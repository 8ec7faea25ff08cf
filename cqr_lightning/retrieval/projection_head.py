"""ANCE's projection head, read from the encoder's own weight files.

ANCE checkpoints (the paper's dense retriever, e.g. `castorini/ance-msmarco-passage`) hold a RoBERTa encoder under
`roberta.*` and, after it, a linear layer `embeddingHead` and a LayerNorm `norm`: a text's vector is
`norm(embeddingHead(h_cls))`. `AutoModel` loads the encoder and drops those two layers as unused, so they are read
here, by name, from the same files (safetensors, or a PyTorch state dict loaded with `weights_only=True`).
"""

from __future__ import annotations

from pathlib import Path

from cqr_lightning.errors import ConfigError

LINEAR_PREFIX = "embeddingHead."
NORM_PREFIX = "norm."
HEAD_KEYS = tuple(f"{prefix}{name}" for prefix in (LINEAR_PREFIX, NORM_PREFIX) for name in ("weight", "bias"))


def model_folder(model: str) -> Path:
    """The local folder of an encoder: the path itself, or the cached snapshot of a hub id (never downloaded)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # the hub client raises several error types for a missing snapshot
        raise ConfigError(f"retriever.model={model!r} is neither a folder nor a cached hub id: {exc}") from exc


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files, safetensors preferred (a checkpoint usually ships one format or both)."""
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(folder.glob("pytorch_model*.bin"))


def read_head_tensors(model: str) -> dict:
    """The four tensors of the head, by key; a ConfigError naming the setting when the checkpoint has none."""
    import torch
    from safetensors import safe_open

    folder = model_folder(model)
    found = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                found.update({key: handle.get_tensor(key) for key in HEAD_KEYS if key in handle.keys()})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            found.update({key: state[key] for key in HEAD_KEYS if key in state})
    missing = [key for key in HEAD_KEYS if key not in found]
    if missing:
        raise ConfigError(
            f"retriever.pooling=ance needs ANCE's projection head, but the weights in {folder} have no "
            f"{', '.join(missing)}; use pooling=cls (or mean) for an encoder without one"
        )
    return found


def load_projection_head(model: str, hidden_size: int):
    """`norm(embeddingHead(x))` as a torch module, in float32, with the checkpoint's weights."""
    import torch

    tensors = read_head_tensors(model)
    out_dim, in_dim = tensors[LINEAR_PREFIX + "weight"].shape
    if in_dim != hidden_size:
        raise ConfigError(
            f"retriever.model={model!r}: its projection head takes {in_dim} dimensions but the encoder gives "
            f"{hidden_size}"
        )
    linear = torch.nn.Linear(in_dim, out_dim)
    norm = torch.nn.LayerNorm(out_dim)
    with torch.no_grad():
        for layer, prefix in ((linear, LINEAR_PREFIX), (norm, NORM_PREFIX)):
            layer.weight.copy_(tensors[prefix + "weight"].float())
            layer.bias.copy_(tensors[prefix + "bias"].float())
    return torch.nn.Sequential(linear, norm).eval()
