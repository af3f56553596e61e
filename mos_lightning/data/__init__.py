"""Data: the embedded shapes domain (procedural, no download)."""
from mos_lightning.data.shapes import (
    CATEGORIES,
    COLOURS,
    RELATIONS,
    SHAPES,
    ShapeObject,
    ShapeScene,
    ShapesDataModule,
    ShapesDataset,
    caption,
    collate,
    make_scene,
    relation_holds,
    render,
    scene_for,
)

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "ShapeObject",
    "ShapeScene",
    "ShapesDataModule",
    "ShapesDataset",
    "caption",
    "collate",
    "make_scene",
    "relation_holds",
    "render",
    "scene_for",
]
