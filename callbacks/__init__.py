"""Lightning callbacks for mos-lightning runs; they read what the model returns, never its insides."""
import warnings

from .evaluation import Evaluation
from .preemption import Preemption
from .progress import StepProgress
from .router_viz import RouterFigures
from .samples import SampleGrid

if __name__ == "callbacks":  # imported by its old top-level name, from a source checkout on sys.path
    warnings.warn("class paths `callbacks.X` are deprecated and will stop working in the next release: "
                  "use `mos_lightning.callbacks.X`", FutureWarning, stacklevel=2)

__all__ = ["Evaluation", "Preemption", "RouterFigures", "SampleGrid", "StepProgress"]
