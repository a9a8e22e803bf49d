"""Fusions of the Wan block's small ops into their neighbours, applied from outside the model.

At 1.3B width the ops between the GEMMs and attention cost ~9% of a compiled forward (issue 3's
profile: LayerNorm + modulation, RMSNorm + RoPE, GELU). Each fusion here removes a memory pass;
none changes the math beyond float rounding, and each can be undone (`unfuse`), so a reference run
(diffusers at its own best settings) can use the same module objects without kino's fusions.

- **ffn_gelu** (CUDA only): the feed-forward's up-projection and its tanh-GELU as one cuBLASLt GEMM
  with a GELU epilogue (`torch._addmm_activation(..., use_gelu=True)`, which inductor keeps as an
  extern call). The GELU is applied to the fp32 accumulator before the bf16 rounding, where the plain
  path rounds, applies GELU in fp32 and rounds again: within one bf16 ulp. On a CPU
  `_addmm_activation` applies the erf GELU, not Wan's tanh one, so CPU modules keep the plain path.
  Done by switching the module's class to a subclass (same object, same parameters and names), so one
  compiled graph serves every block.
- **rope**: the self-attention's rotary embedding as one stacked pointwise expression, which inductor
  fuses with the q/k RMSNorm into a single pass. diffusers writes it through strided slice
  assignments into an empty tensor, which inductor lowers to a slower kernel. The same float32
  products and one rounding to the model dtype: identical in eager mode.
- **wide_rows** (a process-wide inductor choice): LayerNorm/RMSNorm rows up to 8192 wide as
  persistent reductions (one read of the row instead of two); inductor's default stops at 1024, below
  Wan's widths (1536, 5120).

`fuse(transformer, kinds)` returns a `Fusions` handle; `Fusions.disabled()` is a context that undoes
them (for a reference run) and puts them back. This module knows nothing about jobs or schedulers.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint

log = logging.getLogger("kino.fuse")

#: The fusions `fuse` knows, in the order it applies them.
KINDS: tuple[str, ...] = ("ffn_gelu", "rope", "wide_rows")

#: Widest row that "wide_rows" makes a persistent reduction (Wan 14B's width is 5120).
WIDE_ROW_LIMIT = 8192


# ---- ffn_gelu ----


def _gelu_epilogue_ok(ffn: torch.nn.Module) -> bool:
    """A diffusers FeedForward whose first layer is a bias Linear followed by tanh-GELU."""
    if type(ffn) is not FeedForward or len(ffn.net) != 3:
        return False
    act = ffn.net[0]
    proj = getattr(act, "proj", None)
    return (
        type(act) is GELU
        and act.approximate == "tanh"
        and type(proj) is torch.nn.Linear
        and proj.bias is not None
        and isinstance(ffn.net[2], torch.nn.Linear)
    )


class GeluEpilogueFeedForward(FeedForward):
    """diffusers' FeedForward with its up-projection and tanh-GELU as one GEMM (GELU epilogue)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        proj = self.net[0].proj
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        inner = torch._addmm_activation(proj.bias, flat, proj.weight.t(), use_gelu=True)
        inner = self.net[1](inner.view(*hidden_states.shape[:-1], inner.shape[-1]))  # dropout (identity)
        return self.net[2](inner)


def _fuse_ffn(module: torch.nn.Module) -> None:
    module.__class__ = GeluEpilogueFeedForward


def _unfuse_ffn(module: torch.nn.Module) -> None:
    module.__class__ = FeedForward


# ---- rope ----


def rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (B, N, H, D) with interleaved pairs, as one pointwise expression.

    The same float products as diffusers' WanAttnProcessor (x1·cos − x2·sin, x1·sin + x2·cos, with
    cos = freqs_cos[..., 0::2], sin = freqs_sin[..., 1::2]) and one rounding to x's dtype.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


#: Attention on (B, H, N, D) query, key, value -> (B, H, N, D).
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FusedSelfAttnProcessor:
    """A processor for diffusers' WanAttention used as self-attention (attn1): the same projections,
    q/k RMSNorm and attention as diffusers' WanAttnProcessor, with the rotary embedding as `rotate`
    and the attention itself `attend` (exact SDPA by default; quant/attention.py passes its low-bit
    kernel). Anything else (text or image keys, a mask) goes to the processor it replaced. No Python
    branch depends on tensor values, so it compiles with the block."""

    def __init__(self, original: Any, attend: Attend | None = None):
        self.original = original
        self.attend: Attend = attend or F.scaled_dot_product_attention

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # (B, N, H*D)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # (B, N, H, D)
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))  # (B, H, N, D)
        hidden = out.transpose(1, 2).flatten(2, 3).type_as(query)  # (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](hidden))


def _rope_ok(attn: torch.nn.Module) -> bool:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return type(attn.processor) is WanAttnProcessor and not getattr(attn, "is_cross_attention", True)


# ---- wide_rows ----


class WideRowChoices(InductorChoices):
    """inductor's heuristics, with inner reductions up to WIDE_ROW_LIMIT wide kept persistent.

    Module-level so inductor's cache key (which pickles its config by reference) tells compiled
    graphs made with it from those made without it.
    """

    @staticmethod
    def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
        numel = features.reduction_numel
        if (
            torch._inductor.config.triton.persistent_reductions
            and features.get_reduction_hint() == ReductionHint.INNER
            and (isinstance(numel, int) or getattr(numel, "is_number", False))
            and int(numel) <= WIDE_ROW_LIMIT
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)


def _use_choices(cls: type[InductorChoices] | None) -> None:
    """inductor's heuristics class from the next compile on: its config (part of the cache key) and
    the instance it already cached for this thread on its first compile (torch._inductor.virtualized)."""
    from torch._inductor import virtualized

    torch._inductor.config.inductor_choices_class = cls
    virtualized._choices._set_handler((cls or InductorChoices)())


def install_wide_rows() -> None:
    """Make inductor use WideRowChoices from the next compile on (process-wide, idempotent)."""
    if torch._inductor.config.inductor_choices_class is not WideRowChoices:
        _use_choices(WideRowChoices)
        log.info("fuse: inductor makes rows up to %d wide persistent reductions", WIDE_ROW_LIMIT)


@contextmanager
def _default_choices() -> Iterator[None]:
    """inductor's own heuristics for the length of the context."""
    previous = torch._inductor.config.inductor_choices_class
    if previous is None:
        yield
        return
    _use_choices(None)
    try:
        yield
    finally:
        _use_choices(previous)


# ---- the handle ----


@dataclass
class Fusions:
    """What `fuse` applied to one transformer; `disabled()` undoes it for the length of a context."""

    ffn: list[torch.nn.Module] = field(default_factory=list)
    attn: list[torch.nn.Module] = field(default_factory=list)
    active: bool = True

    def unfuse(self) -> None:
        if not self.active:
            return
        for module in self.ffn:
            _unfuse_ffn(module)
        for module in self.attn:
            module.set_processor(module.processor.original)
        self.active = False

    def refuse(self) -> None:
        if self.active:
            return
        for module in self.ffn:
            _fuse_ffn(module)
        for module in self.attn:
            module.set_processor(FusedSelfAttnProcessor(module.processor))
        self.active = True

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The model as diffusers defines it, compiled with inductor's own heuristics, inside the context.

        Blocks first compiled inside the context keep inductor's default choices (dynamo caches one
        graph per variant of the block, so the fused and the plain variant coexist)."""
        was = self.active
        self.unfuse()
        try:
            with _default_choices():
                yield
        finally:
            if was:
                self.refuse()


def fuse(transformer: torch.nn.Module, device: torch.device, kinds: tuple[str, ...] = KINDS) -> Fusions:
    """Apply `kinds` (a subset of KINDS) to a diffusers Wan transformer that runs on `device`, in
    place; logged. The GELU epilogue and wide rows apply on CUDA only. Modules already fused are left."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"fuse: unknown fusions {sorted(unknown)}; known: {KINDS}")
    cuda = device.type == "cuda"
    fusions = Fusions()
    for module in transformer.modules():
        if "ffn_gelu" in kinds and cuda and _gelu_epilogue_ok(module):
            _fuse_ffn(module)
            fusions.ffn.append(module)
        elif "rope" in kinds and hasattr(module, "processor") and hasattr(module, "norm_q") and _rope_ok(module):
            module.set_processor(FusedSelfAttnProcessor(module.processor))
            fusions.attn.append(module)
    if "wide_rows" in kinds and cuda:
        install_wide_rows()
    log.info("fuse: %d FFNs with a GELU epilogue, %d self-attentions with fused RoPE", len(fusions.ffn), len(fusions.attn))
    return fusions
