"""Evaluation: FID, CLIP score and ShapesEval; plain functions and classes, callbacks wrap them."""
