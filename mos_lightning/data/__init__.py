"""Data: the embedded shapes domain (procedural, no download) and image-caption corpora."""
from mos_lightning.data.corpus import BucketedShapesDataset, ImageCaptionDataModule
from mos_lightning.data.layout import relation_holds
from mos_lightning.data.mjhq import MJHQDataset
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
    render,
    scene_for,
)
from mos_lightning.data.sources import FolderDataset, ManifestDataset, ShardDataset

__all__ = [
    "BucketedShapesDataset",
    "FolderDataset",
    "ImageCaptionDataModule",
    "MJHQDataset",
    "ManifestDataset",
    "ShardDataset",
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
