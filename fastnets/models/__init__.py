"""Full models built on fastnets.nn: ResNet (torchvision layout), VGG, SimpleCNN, and
transfer-learning helpers (fastnets.models.transfer)."""
from . import transfer
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101
from .simple_cnn import SimpleCNN
from .vgg import VGG, vgg11, vgg11_bn, vgg16

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "SimpleCNN", "VGG", "resnet18", "resnet34", "resnet50", "resnet101",
           "transfer", "vgg11", "vgg11_bn", "vgg16"]
