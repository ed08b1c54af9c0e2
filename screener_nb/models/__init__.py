"""Networks: 3D UNet backbones, density models, positional encodings."""
