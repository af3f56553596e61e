"""Fusion strategies: each a class chosen by `class_path`, built from the towers' geometry."""
from .base import Fusion
from .mos import MoSFusion

__all__ = ["Fusion", "MoSFusion"]
