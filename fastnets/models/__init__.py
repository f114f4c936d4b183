"""Full models built on fastnets.nn: ResNet (torchvision layout), VGG, SimpleCNN, GPT, BERT,
T5, a character-level LSTM / GRU language model and a sequence classifier, the diffusion
UNet2D (diffusers' UNet2DModel layout), the DCGAN generator / discriminator, the KL
autoencoder (diffusers' AutoencoderKL layout), CLIP / SigLIP (Hugging Face's CLIPModel layout), an image-text
fusion model (cross-attention), and
transfer-learning helpers (fastnets.models.transfer)."""
from . import transfer
from .clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, zero_shot_logits
from .fusion import FusionConfig, ImageTextFusionModel
from .dcgan import DCGANDiscriminator, DCGANGenerator
from .bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from .gpt import GPT, GPTConfig, KVCache
from .rnn import CharLM, CharLMConfig, CharVocab, SequenceClassifier, python_text
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101
from .siglip import SiglipConfig, SiglipModel
from .simple_cnn import SimpleCNN
from .t5 import T5Config, T5ForConditionalGeneration
from .unet import UNet2D, UNet2DConfig, UNet2DOutput
from .vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from .vgg import VGG, vgg11, vgg11_bn, vgg16

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "BasicBlock", "BertConfig", "BertForMaskedLM", "BertForSequenceClassification", "BertModel", "Bottleneck",
           "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPVisionConfig",
           "CharLM", "CharLMConfig", "CharVocab", "DCGANDiscriminator", "DCGANGenerator", "DiagonalGaussian", "FusionConfig", "ImageTextFusionModel", "GPT", "GPTConfig", "KVCache", "ResNet", "SequenceClassifier", "SiglipConfig", "SiglipModel", "SimpleCNN", "T5Config", "T5ForConditionalGeneration", "UNet2D",
           "UNet2DConfig", "UNet2DOutput", "VGG",
           "python_text", "resnet18", "resnet34", "resnet50", "resnet101", "transfer", "vgg11", "vgg11_bn", "vgg16", "zero_shot_logits"]
