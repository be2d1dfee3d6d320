"""The Flower ClientApp: local DP-SGD training of LoRA factors on a node's private data."""
