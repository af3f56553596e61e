"""Lightning callbacks for mos-lightning runs; they read what the model returns, never its insides."""
from .samples import SampleGrid

__all__ = ["SampleGrid"]
