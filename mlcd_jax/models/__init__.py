"""The networks: the ViT family (`vit.py`), CLIP's text transformer (`text.py`), RICE's Region
Transformer layer (`region.py`)."""
