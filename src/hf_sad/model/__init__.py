"""The SAD detector as a transformers model: its config, network, image processor, box operations and supervised
loss (copied beside saved weights as remote code: these files import only torch, torchvision, timm, transformers and
each other), and `builder.py`, which makes fresh detectors and loads saved ones."""
