"""How the Doloris module is optimised (Lightning)."""

from ._archive import damaged_member as damaged_member  # used by scdoloris.model
from ._distributed import DistributedSamplerSeed as DistributedSamplerSeed  # used by scdoloris.model
from ._distributed import world_size_of as world_size_of  # used by scdoloris.model
from ._quiet import quiet_lightning as quiet_lightning  # used by scdoloris.model
from ._training_plan import DolorisTrainingPlan
from ._training_plan import ResumableDataSplitter as ResumableDataSplitter  # used by scdoloris.model
from ._training_plan import checkpointing as checkpointing  # used by scdoloris.model
from ._training_plan import in_fold as in_fold  # used by scdoloris.model

__all__ = ["DolorisTrainingPlan"]
