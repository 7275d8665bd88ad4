"""How the Doloris module is optimised (Lightning)."""

from ._training_plan import DolorisTrainingPlan

__all__ = ["DolorisTrainingPlan"]
