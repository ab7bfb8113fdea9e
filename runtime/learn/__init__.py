"""On-device learning of a new task: masked updates in numpy + the C kernels, under a
RAM budget (planned, then enforced in a child with ``RLIMIT_AS``) and an energy budget
(metered; checkpoint, pause, resume). Never imports torch. See ``docs/learning.md``."""

from .learner import METHODS, ForgettingError, LearnError, RamBudgetError, learn
from .methods import LEARN_METHODS, LearnMethod, get_method

__all__ = ["learn", "METHODS", "LEARN_METHODS", "LearnMethod", "get_method", "LearnError", "RamBudgetError",
           "ForgettingError"]
