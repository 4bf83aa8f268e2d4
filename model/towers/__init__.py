"""The encoders: image and text backbones, their pooling and freezing, and the projection heads."""
