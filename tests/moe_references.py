"""Independent float64 references of the expert op (``kernels/moe_experts.py``), shared by ``test_moe.py`` and
``test_moe_grouped_gemm.py`` (a light module: importing ``test_moe`` pulls in TRL and the model tests)."""
import torch

from fastft.kernels.moe_experts import NF4Experts


def decode_nf4(nf4: NF4Experts) -> torch.Tensor:
    """``[E, out, in]`` float64 values of NF4 experts, from the NF4 definition (not fastft's dequantization):
    ``code[nibble] * (nested_code[absmax] * nested_absmax + offset)``, high nibble first, blocks over the
    row-major expert."""
    E, (out_features, in_features) = nf4.num_experts, nf4.shape
    n = out_features * in_features
    experts = []
    for e in range(E):
        packed = nf4.packed[e].long()
        nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]
        nested = nf4.nested_absmax[e].double().repeat_interleave(nf4.nested_blocksize)[: nf4.absmax.shape[1]]
        scale = nf4.nested_code.double()[nf4.absmax[e].long()] * nested + nf4.offset[e].double()
        values = nf4.code.double()[nibbles] * scale.repeat_interleave(nf4.blocksize)[:n]
        experts.append(values.reshape(out_features, in_features))
    return torch.stack(experts)


def reference_moe(x, index, weights, W_gu, W_d, lora_gu, lora_d):
    """float64: every (token, slot) through its expert's merged weights ``W + s * B @ A``."""
    if lora_gu is not None:
        W_gu = W_gu + lora_gu.scaling * lora_gu.B @ lora_gu.A
    if lora_d is not None:
        W_d = W_d + lora_d.scaling * lora_d.B @ lora_d.A
    gu = torch.einsum("th,tkoh->tko", x, W_gu[index])
    g, u = gu.chunk(2, dim=-1)
    y = torch.einsum("tki,tkoi->tko", torch.nn.functional.silu(g) * u, W_d[index])
    return (weights[..., None] * y).sum(1)


def random_lora(E, out_features, in_features, r=4, std=0.3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(E, r, in_features, generator=gen) * std
    B = torch.randn(E, out_features, r, generator=gen) * std
    return A, B
