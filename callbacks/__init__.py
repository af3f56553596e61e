"""Lightning callbacks for mos-lightning runs; they read what the model returns, never its insides."""
from .evaluation import Evaluation
from .router_viz import RouterFigures
from .samples import SampleGrid

__all__ = ["Evaluation", "RouterFigures", "SampleGrid"]
