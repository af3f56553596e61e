"""FLOPs of a training step from a formula (matmuls and attention only; norms, softmax ignored).

A training step costs 3x the trainable forward (forward + backward's two matmuls per weight).
The frozen understanding tower is memoised during training and is left out.
"""
from __future__ import annotations


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def attention(queries: int, keys: int, dim: int) -> int:
    return 4 * queries * keys * dim  # Q K^T and A V


def block(dim: int, ffn: int, stream: int, context: int, context_tokens: bool) -> int:
    """One generation block: q/out/FFN on the carried stream, K/V on stream (+ context tokens)."""
    f = linear(stream, dim, dim) * 2 + linear(stream, dim, 2 * dim)
    f += linear(stream, dim, 2 * ffn) + linear(stream, ffn, dim)
    f += linear(context, dim, 2 * dim) if context_tokens else 0
    return f + attention(stream, stream + context, dim)


def router(r, prompt: int, latent_tokens: int, d_u: int, d_g: int, m: int, n: int) -> int:
    width = r.prompt.out_features
    seq = prompt + (latent_tokens if r.latent is not None else 0) + (1 if r.timestep is not None else 0)
    per_layer = linear(seq, width, 4 * width) + linear(seq, width, 8 * width) + attention(seq, seq, width)
    f = len(r.blocks) * per_layer + linear(prompt, d_u, width) + linear(prompt, width, m * n)
    return f + (linear(latent_tokens, d_g, width) if r.latent is not None else 0)


def training_flops(model, batch, states) -> int:
    g, gen, fusion = model.geometry, model.generation, model.fusion
    name = type(fusion).__name__
    p = gen.patch_size
    n_img = batch.images.shape[-2] * batch.images.shape[-1] // (p * p)
    prompt = states.mask.shape[1]
    stream = n_img + gen.registers.shape[0] + (prompt if name == "SelfAttentionFusion" else 0)
    ffn = gen.blocks[0].ffn.down.in_features
    in_context = name in ("MoSFusion", "SampleWiseMoSFusion", "HandCraftedFusion", "KeyValueMoSFusion", "MoTFusion")
    tokens_need_kv = name in ("MoSFusion", "SampleWiseMoSFusion", "HandCraftedFusion")
    f = g.generation_layers * block(g.generation_width, ffn, stream, prompt if in_context else 0, tokens_need_kv)
    f += 2 * linear(n_img, p * p * gen.channels, g.generation_width)  # patchify + head
    f += fusion_flops(fusion, name, g, prompt, n_img)
    return 3 * batch.images.shape[0] * f


def fusion_flops(fusion, name: str, g, prompt: int, n_img: int) -> int:
    n, d_u, d_g = g.generation_layers, g.understanding_width, g.generation_width
    if name in ("MoSFusion", "SampleWiseMoSFusion", "KeyValueMoSFusion"):
        routed = fusion.router.m
        d_in, d_out = fusion.proj.weight.shape[1:]
        mix = 2 * prompt * routed * n * d_in  # Eq. 4 as a dense weighted sum
        return router(fusion.router, prompt, n_img, d_u, d_g, routed, n) + mix + linear(n * prompt, d_in, d_out)
    if name == "HandCraftedFusion":
        return linear(n * prompt, d_u, d_g)
    if name == "CrossAttentionFusion":
        per_block = linear(n_img, d_g, d_g) * 2 + linear(prompt, d_g, 2 * d_g) + attention(n_img, prompt, d_g)
        return linear(prompt, d_u, d_g) + n * per_block
    if name == "SelfAttentionFusion":
        return linear(prompt, d_u, d_g)
    return 0  # MoT: the tower's own K/V, no parameters
