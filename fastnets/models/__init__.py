"""Full models built on fastnets.nn: ResNet (torchvision layout), VGG, SimpleCNN, GPT, BERT,
T5, and transfer-learning helpers (fastnets.models.transfer)."""
from . import transfer
from .bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from .gpt import GPT, GPTConfig, KVCache
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101
from .simple_cnn import SimpleCNN
from .t5 import T5Config, T5ForConditionalGeneration
from .vgg import VGG, vgg11, vgg11_bn, vgg16

__all__ = ["BasicBlock", "BertConfig", "BertForMaskedLM", "BertForSequenceClassification", "BertModel", "Bottleneck",
           "GPT", "GPTConfig", "KVCache", "ResNet", "SimpleCNN", "T5Config", "T5ForConditionalGeneration", "VGG",
           "resnet18", "resnet34", "resnet50", "resnet101", "transfer", "vgg11", "vgg11_bn", "vgg16"]
