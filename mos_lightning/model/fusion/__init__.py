"""Fusion strategies: each a class chosen by `class_path`, built from the towers' geometry."""
from .base import Fusion, LayerProjections
from .cross_attn import CrossAttentionFusion
from .hand_crafted import HandCraftedFusion
from .mos import KeyValueMoSFusion, MoSFusion, SampleWiseMoSFusion
from .mot import MoTFusion
from .self_attn import SelfAttentionFusion

__all__ = ["CrossAttentionFusion", "Fusion", "HandCraftedFusion", "KeyValueMoSFusion", "LayerProjections", "MoSFusion",
           "MoTFusion", "SampleWiseMoSFusion", "SelfAttentionFusion"]
