"""Small random-init configurations of the twelve Hugging Face architectures issue 21 names (GPT-2,
Llama, Qwen3, Mixtral, Gemma 3, Phi-3, BERT, ViT, ResNet, MobileNetV2, ConvNeXt, the Whisper
encoder), as a new user would bring them, with inputs at any size their free axes allow.

    >>> arch = ARCHITECTURES["vit"]
    >>> model = arch.build()                 # eval mode, seeded, parameters perturbed
    >>> x = arch.inputs(batch=2, size=1, seed=0)

Causal LMs of a family nnforge's decoders know (``kind == "decoder"``) are passed to nf.compile as
they are and become decoder bundles; the rest are graphs (``kind == "graph"``), wrapped so that
forward returns one tensor. ``size`` is the free non-batch axis: sequence length for text, an
image-size step for CNNs (``size * 32`` pixels), unused (fixed) where the model does not allow it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nnforge.frontend.decoders.importer import CausalLMLogits as Logits  # forward(input_ids) -> logits
from tests.frontend.decoders.families import tiny_model

VOCAB = 128


@dataclass(frozen=True)
class Architecture:
    name: str
    kind: str                                        # "decoder" or "graph"
    build: Callable[[], nn.Module]
    inputs: Callable[..., tuple]                     # inputs(batch=, size=, seed=) -> tuple of tensors
    input_names: tuple[str, ...]
    sizes: tuple[int, ...] = (8, 12, 16)             # example size first, then two others
    convolutional: bool = False


class FirstOutput(nn.Module):
    """forward(*inputs) -> the model's first output (last_hidden_state, logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs)[0]


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Random-init norms are ones and biases zeros; perturb every parameter (and BatchNorm's running
    statistics) so that each of them counts in a comparison."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _from_config(cls_name: str, config_cls: str, seed: int = 0, **kwargs) -> nn.Module:
    import transformers
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    return _perturbed(model, seed)


def _ids(batch: int, size: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(3, VOCAB, (batch, size), generator=g),)


def _text_and_mask(batch: int, size: int, seed: int) -> tuple:
    (ids,) = _ids(batch, size, seed)
    mask = torch.ones_like(ids)
    if batch > 1:                                    # a padded row, so the mask path counts
        mask[-1, size // 2:] = 0
    return ids, mask


def _images(channels: int, pixels: Callable[[int], int]):
    def inputs(batch: int, size: int, seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        side = pixels(size)
        return (torch.randn(batch, channels, side, side, generator=g),)
    return inputs


def _mixtral() -> nn.Module:
    lm = _from_config("MixtralForCausalLM", "MixtralConfig", vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                      attn_implementation="eager")
    return Logits(lm).eval()


def _bert() -> nn.Module:
    return FirstOutput(_from_config("BertModel", "BertConfig", vocab_size=VOCAB, hidden_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    max_position_embeddings=64, attn_implementation="eager",
                                    add_pooling_layer=False)).eval()


def _vit() -> nn.Module:
    return FirstOutput(_from_config("ViTModel", "ViTConfig", hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
                                    attn_implementation="eager", add_pooling_layer=False)).eval()


def _resnet() -> nn.Module:
    return FirstOutput(_from_config("ResNetForImageClassification", "ResNetConfig", embedding_size=16,
                                    hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], layer_type="basic",
                                    num_labels=10)).eval()


def _mobilenet_v2() -> nn.Module:
    return FirstOutput(_from_config("MobileNetV2ForImageClassification", "MobileNetV2Config",
                                    depth_multiplier=0.35, image_size=64, num_labels=10)).eval()


def _convnext() -> nn.Module:
    return FirstOutput(_from_config("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[16, 32, 48, 64],
                                    depths=[1, 1, 1, 1], num_labels=10)).eval()


WHISPER_MELS, WHISPER_FRAMES = 16, 32


def _whisper_encoder() -> nn.Module:
    import transformers
    config = transformers.WhisperConfig(num_mel_bins=WHISPER_MELS, d_model=64, encoder_layers=2,
                                        encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=1,
                                        decoder_attention_heads=4, decoder_ffn_dim=128,
                                        max_source_positions=WHISPER_FRAMES // 2, vocab_size=VOCAB,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    encoder = WhisperEncoder(config)
    return FirstOutput(_perturbed(encoder, 0)).eval()


def _whisper_inputs(batch: int, size: int, seed: int) -> tuple:
    # the encoder's positions are a fixed table: its frame count is not a free axis
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, WHISPER_MELS, WHISPER_FRAMES, generator=g),)


def _decoder(family: str) -> Callable[[], nn.Module]:
    return lambda: tiny_model(family)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    Architecture("gpt2", "decoder", _decoder("gpt2"), _ids, ("input_ids",)),
    Architecture("llama", "decoder", _decoder("llama"), _ids, ("input_ids",)),
    Architecture("qwen3", "decoder", _decoder("qwen3"), _ids, ("input_ids",)),
    Architecture("gemma3", "decoder", _decoder("gemma3"), _ids, ("input_ids",)),
    Architecture("phi3", "decoder", _decoder("phi3"), _ids, ("input_ids",)),
    Architecture("mixtral", "graph", _mixtral, _ids, ("input_ids",)),
    Architecture("bert", "graph", _bert, _text_and_mask, ("input_ids", "attention_mask")),
    Architecture("vit", "graph", _vit, _images(3, lambda size: 32), ("pixel_values",), sizes=(1,)),
    Architecture("resnet", "graph", _resnet, _images(3, lambda size: 32 * size), ("pixel_values",),
                 sizes=(2, 1, 3), convolutional=True),
    # its TF-style padding reads the image size as a Python int: torch.export fixes the size
    Architecture("mobilenet_v2", "graph", _mobilenet_v2, _images(3, lambda size: 32 * size), ("pixel_values",),
                 sizes=(2,), convolutional=True),
    Architecture("convnext", "graph", _convnext, _images(3, lambda size: 32 * size), ("pixel_values",),
                 sizes=(2, 1, 3), convolutional=True),
    Architecture("whisper_encoder", "graph", _whisper_encoder, _whisper_inputs, ("input_features",), sizes=(1,),
                 convolutional=True),
]}
