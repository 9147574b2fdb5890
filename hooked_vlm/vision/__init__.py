from .vit import ViTTower, hidden_state_index, vision_block

__all__ = ["ViTTower", "hidden_state_index", "vision_block"]
