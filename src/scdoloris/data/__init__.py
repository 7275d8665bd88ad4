"""What Doloris keeps of its training data: scale, control statistics, graph features, mask references."""

from ._summary import TrainingSummary, summarize_training_data

__all__ = ["TrainingSummary", "summarize_training_data"]
