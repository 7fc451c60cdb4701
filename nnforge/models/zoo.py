"""Small models with the structure of common families, built in code with random weights: for
structure tests and CLI demos (no downloads).

- ``resnet18``: torchvision's ResNet-18 architecture (BasicBlock [2, 2, 2, 2]) with the same module
  names, so torchvision state dicts load into it. It is defined here because PyPI's torchvision
  does not import beside the CPU build of torch 2.13 that nnforge pins.
- ``llama``: a Llama-style causal LM from a ``transformers`` LlamaConfig (RMSNorm, rotary
  embeddings, grouped-query attention, SwiGLU), returning logits.
- ``minilm``: the embedded default model.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..frontend.decoders.importer import CausalLMLogits


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias, 0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    torch.manual_seed(0)
    return ResNet((2, 2, 2, 2), num_classes).eval()


def llama(hidden: int = 256, layers: int = 2, heads: int = 8, kv_heads: int = 4, vocab: int = 1024,
          intermediate: int = 688, max_positions: int = 512) -> CausalLMLogits:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    return CausalLMLogits(LlamaForCausalLM(cfg).eval()).eval()


def _minilm():
    from .default import dynamic_shapes, encode, load_default_model, sentence_splits
    model, tok = load_default_model()
    _, evals = sentence_splits()
    return model, encode(tok, evals[:4]), dynamic_shapes(), ["input_ids", "attention_mask"], ["embeddings"]


def _bert_base():
    """BERT-base's shape (12 layers, hidden 768, FFN 3072, 12 heads) with random weights (seeded),
    the pooling of the default model, and its tokenizer (the same 30,522-token vocabulary)."""
    from transformers import BertConfig, BertModel
    from .default import DefaultModel, dynamic_shapes, encode, load_default_model, sentence_splits
    _, tok = load_default_model()
    _, evals = sentence_splits()
    torch.manual_seed(0)
    model = DefaultModel(BertModel(BertConfig(), add_pooling_layer=False)).eval()
    return model, encode(tok, evals[:4]), dynamic_shapes(), ["input_ids", "attention_mask"], ["embeddings"]


def _resnet18():
    from torch.export import Dim
    return resnet18(), (torch.randn(2, 3, 224, 224),), ({0: Dim("batch", max=1024)},), ["image"], ["logits"]


def _llama():
    from torch.export import Dim
    torch.manual_seed(1)
    return llama(), (torch.randint(0, 1024, (1, 16)),), ({1: Dim("seq", max=512)},), ["input_ids"], ["logits"]


# name -> factory returning (model, example_inputs, dynamic_shapes, input_names, output_names)
ZOO: dict[str, Callable] = {"minilm": _minilm, "bert-base": _bert_base, "resnet18": _resnet18, "llama": _llama}


def zoo_model(name: str):
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; available: {', '.join(ZOO)}")
    return ZOO[name]()
